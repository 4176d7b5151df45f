"""Routers as a Hub artefact, end to end, printing each step (the transcript of issue 23).

    PYTHONPATH=src python examples/hub_roundtrip.py [WORKDIR]

1. ``skipgpt train-router`` on ``random:llama`` (a few steps, sequence length 16);
2. the finished output holds no optimizer state;
3. ``SkipGPTModel.push_to_hub`` to a Hub repo (here a file-backed stand-in for the Hub API,
   ``tests/hub_mock.py``: no network) with its model card;
4. ``SkipGPTModel.from_pretrained(repo_id)`` in another process (which installs the same stand-in)
   gives logits identical to the local model's;
5. the wrapped HF model's ``save_pretrained`` refuses in one line; ``transformers.pipeline`` takes
   the routed model.

With a real Hub login, drop the stand-in: the same calls go to huggingface.co.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import hub_mock  # noqa: E402

from skipgpt import SkipGPTError, SkipGPTModel  # noqa: E402
from skipgpt.cli import main  # noqa: E402

REPO_ID = "demo-user/llama-routers"
CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import hub_mock
hub_mock.install(sys.argv[2])
from skipgpt import SkipGPTModel
model = SkipGPTModel.from_pretrained(sys.argv[3]).eval()
print("   child: loaded", sys.argv[3], "base", model.base_spec, "from", model.metadata.get("dataset"))
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[4])).logits, sys.argv[4] + ".out")
"""


def step(text: str) -> None:
    print(f"\n## {text}", flush=True)


def run(work: Path) -> None:
    data = work / "text.txt"
    data.write_text(" ".join(f"word{i % 53} and some more text, number {i}." for i in range(200)))
    out = work / "runs" / "rt"
    argv = ["train-router", "--model", "random:llama", "--dataset", str(data), "--seq-len", "16"]
    argv += ["--max-blocks", "8", "--batch-size", "2", "--max-steps", "4", "--calibrate-blocks", "2"]
    argv += ["--output", str(out)]
    step("1. train routers")
    print("$ skipgpt " + shlex.join(argv))
    assert main(argv) == 0

    step("2. the finished output")
    for p in sorted(out.rglob("*")):
        print(f"   {p.relative_to(out)}  ({p.stat().st_size} bytes)")
    print(f"   checkpoint/ (optimizer state) present: {(out / 'checkpoint').exists()}")

    step("3. push_to_hub (file-backed Hub stand-in)")
    hub = work / "hub"
    hub_mock.install(hub)
    model = SkipGPTModel.from_pretrained(out).eval()
    url = model.push_to_hub(REPO_ID)
    (sha,) = hub_mock.commits(hub, REPO_ID)
    print(f"   pushed: {url}")
    commit = hub / REPO_ID / "commits" / sha
    print("   repo files:", sorted(p.relative_to(commit).as_posix() for p in commit.rglob("*")))
    card = (commit / "README.md").read_text()
    print("   model card:")
    for line in card.splitlines():
        print("   | " + line)

    step("4. from_pretrained by repo id in another process")
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ids_file = work / "ids.pt"
    torch.save(ids, ids_file)
    child = [sys.executable, "-c", CHILD, str(REPO / "tests"), str(hub), REPO_ID, str(ids_file)]
    subprocess.run(child, check=True)
    with torch.no_grad():
        mine = model(input_ids=ids).logits
    theirs = torch.load(str(ids_file) + ".out")
    diff = (mine - theirs).abs().max().item()
    print(f"   logits identical: {torch.equal(mine, theirs)} (max |diff| {diff})")
    assert torch.equal(mine, theirs)

    step("5. no silent corruption; transformers.pipeline")
    try:
        model.hf_model.save_pretrained(work / "hf")
    except SkipGPTError as e:
        print(f"   model.hf_model.save_pretrained -> SkipGPTError: {e}")
    try:
        model.save_pretrained(work / "x", max_shard_size="1GB")
    except SkipGPTError as e:
        print(f"   model.save_pretrained(max_shard_size=...) -> SkipGPTError: {e}")
    import transformers

    from skipgpt.specs import byte_tokenizer

    pipe = transformers.pipeline("text-generation", model=model, tokenizer=byte_tokenizer())
    model.reset_stats()
    text = pipe("hello", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    print(
        f"   pipeline('text-generation', model=routed) -> {text!r}; module sparsity {model.sparsity_stats()['module']:.3f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        work = Path(sys.argv[1])
        work.mkdir(parents=True, exist_ok=True)
        run(work)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))
