"""Transcript: ``skipgpt export`` -> plain transformers (no skipgpt) loads the folder routed.

For each source (``--routers``: a skipgpt folder; ``random:llama``, the default, makes one with
untrained routers that skip about half the decisions) it runs ``skipgpt export``, loads the
output with ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` in a process
where ``import skipgpt`` fails, and compares logits, sparsity and greedy generation with
skipgpt's routed model (fast path); then loads it without remote code (dense) and shows that
``--merge`` without an adapter is refused. Prints Markdown::

    PYTHONPATH=src python3 examples/export_roundtrip.py --routers random:llama \\
        --routers runs/rt100-params25 > results/export_roundtrip.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from skipgpt import SkipGPTConfig, get_skipgpt_model, load_model
from skipgpt.specs import load_base_model

# what runs in the process without skipgpt
PLAIN = r"""
import json, sys
class _NoSkipgpt:
    def find_spec(self, name, path=None, target=None):
        if name == "skipgpt" or name.startswith("skipgpt."):
            raise ImportError("skipgpt is blocked in this process")
sys.meta_path.insert(0, _NoSkipgpt())
import torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
stats = model.skipgpt_state.stats
sparsity = sum(stats.skipped.values()) / sum(stats.counted.values())  # of this forward
generated = model.generate(ids[-1:], max_new_tokens=12, do_sample=False)  # the longer prompt: no padding
torch.save({"logits": logits, "generated": generated}, out_file)
print(json.dumps({
    "class": type(model).__name__,
    "layer": type(model.model.layers[0]).__module__ + "." + type(model.model.layers[0]).__name__,
    "theta": model.skipgpt_state.settings.threshold,
    "sparsity": sparsity,
    "skipgpt_imported": any(m == "skipgpt" or m.startswith("skipgpt.") for m in sys.modules),
}))
"""


def sh(argv: list[str], env=None) -> subprocess.CompletedProcess:
    print(f"$ {' '.join(argv)}")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    tail = (
        (proc.stdout.strip().splitlines() or [""])[-1] if proc.returncode == 0 else proc.stderr.strip()[-800:]
    )
    print(f"(exit {proc.returncode}) {tail}\n")
    return proc


def roundtrip(source: str, work: Path) -> None:
    print(f"## {source}\n\n```")
    if source.startswith("random:"):
        base, _ = load_base_model(source)
        config = SkipGPTConfig(router_init="paper", router_hidden=0, threshold=0.5)
        get_skipgpt_model(base, config, source).save_pretrained(work / "routers")
        print(f"# untrained routers on {source} (paper init, θ = 0.5) saved to {work / 'routers'}\n")
        source = str(work / "routers")
    out = work / "export"
    skipgpt = [sys.executable, "-m", "skipgpt"]
    t0 = time.perf_counter()
    sh([*skipgpt, "export", "--model", source, "--output", str(out), "--json"])
    print(f"# export took {time.perf_counter() - t0:.0f} s; files: {sorted(p.name for p in out.iterdir())}\n")

    model, tok = load_model(str(out))
    batch = tok(
        ["The capital of France is", "Routers decide, token by token, which"],
        return_tensors="pt",
        padding=True,
    )
    ids = batch["input_ids"]
    torch.save(ids, work / "ids.pt")
    model.reset_stats()
    with torch.no_grad():
        ref = model(ids).logits
    ref_sparsity = model.sparsity_stats()["module"]
    ref_gen = model.generate(ids[-1:], max_new_tokens=12, do_sample=False)

    (work / "plain.py").write_text(PLAIN)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_MODULES_CACHE": str(work / "modules")
    }
    proc = sh(
        [sys.executable, "-I", str(work / "plain.py"), str(out), str(work / "ids.pt"), str(work / "got.pt")],
        env,
    )
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    got = torch.load(work / "got.pt")
    print(f"# plain transformers, skipgpt not importable: {seen}")
    print(f"# skipgpt.load_model: θ = {model.routing_settings.threshold}, module sparsity {ref_sparsity:.4f}")
    print(f"# max |logits(plain) - logits(skipgpt)| = {float((got['logits'] - ref).abs().max()):.3g}")
    print(
        f"# sparsity equal: {seen['sparsity'] == ref_sparsity}; greedy generate equal: {torch.equal(got['generated'], ref_gen)}"
    )
    print(f"# generated: {tok.decode(ref_gen[0])!r}\n")

    dense = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad(), model.dense():
        diff = float((dense(ids).logits - model(ids).logits).abs().max())
    print(
        f"# without trust_remote_code: {type(dense.model.layers[0]).__name__} (dense); max |diff| to skipgpt's dense = {diff:.3g}"
    )
    card = (out / "README.md").read_text()
    print("# README.md says: " + next(line for line in card.splitlines() if "DENSE" in line) + "\n")
    sh([*skipgpt, "export", "--model", source, "--output", str(work / "merged"), "--merge"])
    print("```\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--routers", action="append", help="skipgpt folder to export, or random:<arch> (repeatable)"
    )
    args = parser.parse_args()
    print("# Export round trip: routing that survives `skipgpt export`\n")
    print(f"`examples/export_roundtrip.py`, torch {torch.__version__}, CPU. Output of one run.\n")
    for source in args.routers or ["random:llama"]:
        with tempfile.TemporaryDirectory() as tmp:
            roundtrip(source, Path(tmp))


if __name__ == "__main__":
    main()
