"""CLI runs end to end and their refusals, on random:llama with tiny settings.

A refusal is ``error: <one line>`` on stderr, exit status 2, and no change to what an earlier
run left on disk (compared byte for byte).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import routed

from skipgpt.cli import main


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder`` (relative path -> bytes; None for a folder)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def one_error_line(capsys) -> str:
    """The captured stdout is empty and stderr is exactly one ``error: ...`` line; returns it."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"word{i % 53} and some more text, number {i}." for i in range(600)))
    return path


# -- compare: a budget that differs from the finished folders' ----------------------------------------
def earlier_compare(out: Path, method: str) -> None:
    """What an earlier ``compare --sparsity 0.25`` left: its tables and one finished model folder."""
    folder = out / "models" / method
    if method == "shortgpt":
        folder.mkdir(parents=True)
        (folder / "shortgpt.json").write_text(json.dumps({"method": "shortgpt", "target_sparsity": 0.25}))
    else:  # a real routed folder, its budget in its router config
        model, _ = routed("llama", target_sparsity=0.25, budget="params")
        model.save_pretrained(folder)
    (out / "compare.json").write_text(json.dumps({"target_sparsity": 0.25, "rows": [], "complete": True}))
    (out / "compare.md").write_text("| method | params sparsity |\n|---|---|\n| Dense | 0.0 |\n")


def compare_argv(out: Path, text: Path, sparsity: str) -> list[str]:
    argv = ["compare", "--model", "random:llama", "--sparsity", sparsity, "--out", str(out)]
    argv += ["--methods", "shortgpt,skipgpt", "--dataset", str(text), "--eval-datasets", str(text)]
    argv += ["--seq-len", "16", "--max-blocks", "4", "--max-steps", "1", "--batch-size", "2"]
    argv += ["--calib-blocks", "2", "--calibrate-blocks", "0", "--eval-seq-len", "32", "--max-windows", "1"]
    return argv + ["--speed-tokens", "0"]


@pytest.mark.parametrize("method", ["shortgpt", "skipgpt"])
def test_compare_refuses_a_mixed_budget_and_leaves_earlier_outputs_byte_identical(
    tmp_path, text, capsys, method
):
    out = tmp_path / "cmp"
    earlier_compare(out, method)
    before = snapshot(out)
    assert main(compare_argv(out, text, "0.5")) == 2
    line = one_error_line(capsys)
    assert line == f"error: {out}/models/{method} was built for sparsity 0.25, not 0.5; give a new --output"
    assert snapshot(out) == before  # compare.json, compare.md and the model folder untouched, nothing added


def test_compare_refusal_as_a_process_exits_2_with_one_line(tmp_path, text):
    """``python -m skipgpt compare``: the whole stderr of the process is the one error line."""
    out = tmp_path / "cmp"
    earlier_compare(out, "shortgpt")
    before = snapshot(out)
    env = dict(os.environ, PYTHONWARNINGS="default")  # a warning on import would show up here
    proc = subprocess.run(
        [sys.executable, "-m", "skipgpt", *compare_argv(out, text, "0.5")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {out}/models/shortgpt was built for sparsity 0.25, not 0.5; give a new --output"
    ]
    assert proc.stdout == ""
    assert snapshot(out) == before


# -- train-router end to end, and its refusals -----------------------------------------------------
def train_argv(out: Path, text: Path, *extra: str) -> list[str]:
    argv = ["train-router", "--model", "random:llama", "--dataset", str(text), "--seq-len", "16"]
    argv += ["--max-blocks", "8", "--max-steps", "2", "--batch-size", "2", "--save-every", "1"]
    argv += ["--target-sparsity", "0.3", "--budget", "params", "--router-init", "paper"]
    return argv + ["--calibrate-blocks", "2", "--output", str(out), *extra]


def test_train_router_end_to_end_then_its_refusals(tmp_path, text, capsys):
    from skipgpt.config import CONFIG_NAME, SkipGPTConfig
    from skipgpt.loading import load_model
    from skipgpt.model import SkipGPTModel

    out = tmp_path / "routed"
    assert main(train_argv(out, text, "--json", "--keep-checkpoint")) == 0  # kept to test --resume
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["output"] == str(out) and summary["steps"] == 2
    assert summary["final_loss"] > 0 and set(summary["sparsity"]) >= {"module", "attn", "mlp", "params"}

    record = SkipGPTConfig.read_json(out / CONFIG_NAME)  # what the options asked for was saved
    assert record["base_model"] == "random:llama"
    rc = record["router_config"]
    assert (rc["target_sparsity"], rc["budget"], rc["router_init"]) == (0.3, "params", "paper")
    meta = record["metadata"]
    assert meta["stage"] == "router_tuning" and meta["dataset"] == str(text) and meta["seq_len"] == 16
    assert [h["step"] for h in meta["history"]] == [0, 1] and meta["loop"]["max_steps"] == 2
    assert meta["threshold_calibration"]["blocks"] == 2
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["loop_args"]["batch_size"] == 2
    model, _ = load_model(str(out))
    assert isinstance(model, SkipGPTModel) and model.state.threshold == pytest.approx(
        record["router_config"]["threshold"]
    )
    ids = torch.randint(3, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    finished = snapshot(out)

    # a finished folder is not overwritten by accident
    assert main(train_argv(out, text)) == 2
    assert one_error_line(capsys) == (
        f"error: {out} already holds a trained model; pass --resume to continue or --overwrite"
    )
    assert snapshot(out) == finished

    # resuming with other training settings is refused, the checkpoint untouched
    assert main(train_argv(out, text, "--resume", "--lr", "0.01")) == 2
    assert one_error_line(capsys).startswith(
        "error: --resume needs the same training settings as the interrupted run; they differ"
    )
    assert snapshot(out) == finished

    # --resume with nothing to resume from
    fresh = tmp_path / "fresh"
    assert main(train_argv(fresh, text, "--resume")) == 2
    assert one_error_line(capsys).startswith(f"error: no checkpoint to resume from in {fresh}")
    assert not fresh.exists() or snapshot(fresh) == {}
