"""Routers as a Hub artefact (peft style), base paths relative to the folder, finished outputs
without optimizer state, and no silent corruption through the wrapped HF model.

The Hub is ``hub_mock`` (a file-backed stand-in for the ``huggingface_hub`` calls skipgpt makes):
no network. A second process installs the same mock to load by repo id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hub_mock
import pytest
import torch
from conftest import random_ids, routed, tiny

from skipgpt import SkipGPTError, SkipGPTModel, checkpoint, load_model
from skipgpt.cli import main

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TRAIN = ["train-router", "--model", "random:llama", "--seq-len", "16", "--max-blocks", "4"]
TRAIN += ["--batch-size", "2", "--max-steps", "2", "--save-every", "1", "--calibrate-blocks", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text) -> Path:
    """Routers trained on random:llama by the CLI (2 steps, seq len 16)."""
    out = tmp_path_factory.mktemp("run") / "rt"
    assert main([*TRAIN, "--dataset", str(text), "--output", str(out)]) == 0
    return out


@pytest.fixture
def hub(tmp_path):
    root = tmp_path / "hub"
    undo = hub_mock.install(root)
    yield root
    undo()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# -- finished outputs ----------------------------------------------------------------------------
def test_finished_output_holds_no_optimizer_state_and_refuses_resume(trained, text, capsys):
    assert sorted(p.name for p in trained.iterdir()) == ["routers.safetensors", "skipgpt_config.json"]
    record = checkpoint.read(trained)
    assert record.metadata["command"].startswith("skipgpt train-router --model random:llama")
    capsys.readouterr()
    assert (
        main([*TRAIN, "--dataset", str(text), "--output", str(trained), "--resume", "--max-steps", "3"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {trained} holds a finished model without its training checkpoint (removed when it "
        "finished; train with --keep-checkpoint to resume later); pass --overwrite to train again"
    ]


def test_keep_checkpoint_keeps_it_and_a_resume_with_more_steps_is_handled_as_before(tmp_path, text, capsys):
    out = tmp_path / "kept"
    argv = [*TRAIN, "--calibrate-blocks", "0", "--dataset", str(text), "--output", str(out)]
    assert main([*argv, "--max-steps", "1", "--keep-checkpoint"]) == 0
    assert (out / "checkpoint" / "optimizer.pt").is_file()
    # as before: more steps change the schedule, so the resume is refused naming the setting
    assert main([*argv, "--max-steps", "2", "--resume"]) == 2
    assert "they differ in max_steps (checkpoint 1, now 2)" in capsys.readouterr().err
    assert main([*argv, "--max-steps", "1", "--resume"]) == 0  # keep_checkpoint is no training setting
    assert not (out / "checkpoint").exists()


def test_a_kill_while_discarding_leaves_a_finished_folder_the_next_run_tidies(tmp_path, text):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "skipgpt", *TRAIN, "--calibrate-blocks", "0", "--dataset", str(text)]
    killed = subprocess.run(
        [*argv, "--output", str(out)],
        env={**ENV, "SKIPGPT_TEST_PAUSE_AT": "discard:checkpoint"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "checkpoint").exists() and checkpoint.read(out).routed
    stale = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert len(stale) == 1 and stale[0].startswith(".checkpoint.discard-")
    again = subprocess.run(
        [*argv, "--output", str(out), "--overwrite"], env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["routers.safetensors", "skipgpt_config.json"]


# -- the Hub -------------------------------------------------------------------------------------
LOAD_IN_ANOTHER_PROCESS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import hub_mock
hub_mock.install(sys.argv[2])
from skipgpt import SkipGPTModel, load_model
model = SkipGPTModel.from_pretrained(sys.argv[3], revision=sys.argv[5] or None).eval()
ids = torch.load(sys.argv[4])
with torch.no_grad():
    out = {"from_pretrained": model(input_ids=ids).logits}
    out["load_model"] = load_model(sys.argv[3])[0](input_ids=ids).logits
torch.save(out, sys.argv[4] + ".out")
"""


def _load_elsewhere(hub: Path, repo_id: str, ids: torch.Tensor, tmp_path: Path, revision: str = "") -> dict:
    ids_file = tmp_path / f"ids-{revision or 'main'}.pt"
    torch.save(ids, ids_file)
    argv = [
        sys.executable,
        "-c",
        LOAD_IN_ANOTHER_PROCESS,
        str(TESTS),
        str(hub),
        repo_id,
        str(ids_file),
        revision,
    ]
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(str(ids_file) + ".out")


def test_push_to_hub_then_from_pretrained_by_id_in_another_process_gives_identical_logits(
    trained, hub, tmp_path
):
    model = SkipGPTModel.from_pretrained(trained).eval()
    ids = random_ids(2, 12, model.config.vocab_size)
    want = logits(model, ids)
    url = model.push_to_hub("me/llama-routers")
    repo = hub / "me" / "llama-routers"
    (first,) = hub_mock.commits(hub, "me/llama-routers")
    assert first in url
    files = sorted(
        p.relative_to(repo / "commits" / first).as_posix() for p in (repo / "commits" / first).rglob("*")
    )
    assert files == ["README.md", "routers.safetensors", "skipgpt_config.json"]  # no checkpoint, no optimizer
    card = (repo / "commits" / first / "README.md").read_text()
    assert "library_name: skipgpt" in card and "random:llama" in card
    assert "skipgpt train-router --model random:llama" in card and "realised sparsity" in card

    got = _load_elsewhere(hub, "me/llama-routers", ids, tmp_path)
    assert torch.equal(got["from_pretrained"], want) and torch.equal(got["load_model"], want)

    # a second push (other θ) through save_pretrained(push_to_hub=True); the first commit stays loadable
    model.set_threshold(0.9)
    model.save_pretrained(tmp_path / "second", push_to_hub=True, repo_id="me/llama-routers")
    assert len(hub_mock.commits(hub, "me/llama-routers")) == 2
    assert SkipGPTModel.from_pretrained("me/llama-routers").routing_settings.threshold == pytest.approx(0.9)
    old = _load_elsewhere(hub, "me/llama-routers", ids, tmp_path, revision=first)
    assert torch.equal(old["from_pretrained"], want)


def test_a_plain_model_repo_still_loads_as_a_plain_model(hub, monkeypatch):
    import huggingface_hub

    import skipgpt.specs

    plain = hub.parent / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    huggingface_hub.create_repo("org/plain", exist_ok=True)
    huggingface_hub.upload_folder(repo_id="org/plain", folder_path=str(plain))
    asked = []
    monkeypatch.setattr(
        skipgpt.specs,
        "load_base_model",
        lambda spec, dtype=None, device_map=None: asked.append(spec) or tiny(),
    )
    model, _ = load_model("org/plain")
    assert asked == ["org/plain"] and not isinstance(model, SkipGPTModel)


def test_an_unreachable_or_offline_hub_is_one_line_naming_the_id(monkeypatch, tmp_path):
    import skipgpt.hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SkipGPTError) as exc:
        SkipGPTModel.from_pretrained("skipgpt-test/not-cached-anywhere", revision="v1")
    assert one_line(exc) == (
        "no local folder 'skipgpt-test/not-cached-anywhere', and cannot download skipgpt repo "
        "'skipgpt-test/not-cached-anywhere' (revision v1): not in the local "
        "Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE)"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(skipgpt.hub, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(
        SkipGPTError, match=r"'skipgpt-test/not-cached-anywhere': .* Hub is unreachable$"
    ) as exc:
        SkipGPTModel.from_pretrained("skipgpt-test/not-cached-anywhere")
    one_line(exc)


def test_push_refuses_a_base_model_others_cannot_load(hub, tmp_path):
    base, tok = tiny()
    base.save_pretrained(tmp_path / "base")
    from skipgpt import SkipGPTConfig, get_skipgpt_model

    model = get_skipgpt_model(base, SkipGPTConfig(), base_spec=str(tmp_path / "base"))
    with pytest.raises(SkipGPTError, match=r"is the local path .* pass base_model='org/name'") as exc:
        model.push_to_hub("me/local-base")
    one_line(exc)
    model.push_to_hub("me/local-base", base_model="random:llama")  # named: fine
    assert SkipGPTModel.from_pretrained("me/local-base").base_spec == "random:llama"


# -- base paths relative to the folder -----------------------------------------------------------
def test_a_local_base_is_recorded_relative_to_the_folder_and_survives_a_move(tmp_path, monkeypatch):
    project = tmp_path / "project"
    base, tok = tiny()
    base.save_pretrained(project / "models" / "base")
    tok.save_pretrained(project / "models" / "base")
    monkeypatch.chdir(project)
    from skipgpt import SkipGPTConfig, get_skipgpt_model

    loaded, _ = load_model("models/base")
    model = get_skipgpt_model(loaded, SkipGPTConfig(), base_spec="models/base")  # as typed: cwd-relative
    model.save_pretrained(project / "runs" / "rt")
    raw = json.loads((project / "runs" / "rt" / checkpoint.CONFIG_NAME).read_text())
    assert raw["base_model"] == "../../models/base" and raw["base_model_relative"] is True
    assert raw["format_version"] == checkpoint.FORMAT_VERSION == 2
    ids = random_ids(1, 10, model.config.vocab_size)
    want = logits(model.eval(), ids)

    moved = tmp_path / "elsewhere" / "deeper"
    moved.parent.mkdir()
    shutil.move(project, moved)
    monkeypatch.chdir(tmp_path)  # another working directory
    again, _ = load_model(str(moved / "runs" / "rt"))
    assert again.base_spec == str(moved / "models" / "base")
    assert torch.equal(logits(again, ids), want)


def test_version_1_records_with_absolute_or_cwd_relative_bases_still_load(tmp_path, monkeypatch):
    base, tok = tiny()
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = routed()
    model.save_pretrained(tmp_path / "rt")
    path = tmp_path / "rt" / checkpoint.CONFIG_NAME
    raw = json.loads(path.read_text())
    assert raw["base_model"] == "random:llama" and "base_model_relative" not in raw  # ids stay as they are
    monkeypatch.chdir(tmp_path)
    for recorded in (str(tmp_path / "base"), "base"):
        path.write_text(json.dumps(raw | {"format_version": 1, "base_model": recorded}))
        record = checkpoint.read(tmp_path / "rt")
        assert record.base_model == recorded and record.format_version == 1
        assert isinstance(load_model(str(tmp_path / "rt"))[0], SkipGPTModel)


# -- no silent corruption ------------------------------------------------------------------------
def test_writers_of_the_wrapped_hf_model_refuse_in_one_line_until_unwrap(tmp_path):
    model, _ = routed()
    for call in (
        lambda: model.hf_model.save_pretrained(tmp_path / "hf"),
        lambda: model.get_base_model().push_to_hub("me/x"),
    ):
        with pytest.raises(
            SkipGPTError,
            match=r"call model\.\w+\(\.\.\.\) on the SkipGPTModel .* model\.unwrap\(\) first, or skipgpt export$",
        ) as exc:
            call()
        one_line(exc)
    assert not (tmp_path / "hf").exists()
    # state_dict stays torch's (routed keys): right for load_state_dict into a wrapped model
    keys = model.hf_model.state_dict().keys()
    assert any(".base_layer." in k for k in keys) and any(".routers." in k for k in keys)

    # the wrapper's own save_pretrained takes transformers' common keyword, refuses the others
    model.save_pretrained(tmp_path / "rt", safe_serialization=True)
    assert checkpoint.read(tmp_path / "rt").routed
    with pytest.raises(SkipGPTError, match="safetensors only") as exc:
        model.save_pretrained(tmp_path / "rt", safe_serialization=False)
    one_line(exc)
    with pytest.raises(
        SkipGPTError,
        match=r"max_shard_size: transformers option\(s\) for full weights; call model\.unwrap\(\)",
    ) as exc:
        model.save_pretrained(tmp_path / "rt", max_shard_size="1GB")
    one_line(exc)
    with pytest.raises(SkipGPTError, match="unknown option") as exc:
        model.save_pretrained(tmp_path / "rt", bogus=1)
    one_line(exc)

    hf = model.unwrap()
    hf.save_pretrained(tmp_path / "plain")  # the plain model again: transformers' own method
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert set(reloaded.state_dict()) == set(tiny()[0].state_dict())


def test_push_to_hub_on_the_wrapper_is_skipgpts_not_the_base_models(hub):
    model, _ = routed()
    model.push_to_hub("me/wrapper")
    (sha,) = hub_mock.commits(hub, "me/wrapper")
    assert checkpoint.read(hub / "me" / "wrapper" / "commits" / sha).routed


def test_from_pretrained_dtype_and_device_map_keep_routers_fp32(trained):
    model = SkipGPTModel.from_pretrained(trained, dtype=torch.bfloat16, device_map="cpu")
    assert next(model.hf_model.lm_head.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.router_parameters())


# -- transformers.pipeline -----------------------------------------------------------------------
def test_text_generation_pipeline_takes_the_routed_model(monkeypatch):
    import transformers
    from transformers.pipelines import base

    errors = []
    monkeypatch.setattr(base.logger, "error", lambda msg, *a, **k: errors.append(msg))
    model, tok = routed(router_init="paper", threshold=0.5)
    model.eval()
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tok)
    model.reset_stats()
    out = pipe("hello", max_new_tokens=5, do_sample=False, return_full_text=False)
    assert errors == []
    assert model.sparsity_stats()["module"] > 0  # the pipeline's generation really was routed
    ids = tok("hello", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"] == tok.decode(want[0, ids.shape[1] :], skip_special_tokens=True)


def test_the_cli_takes_a_skipgpt_repo_id_as_a_model_spec(trained, hub, text, capsys):
    SkipGPTModel.from_pretrained(trained).push_to_hub("me/cli-routers")
    argv = ["eval", "ppl", "--model", "me/cli-routers", "--dataset", str(text), "--seq-len", "16"]
    assert main([*argv, "--max-windows", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "me/cli-routers" and result["sparsity"]["module"] > 0
