"""Fault injection: a training run killed (SIGKILL) anywhere loses nothing and mixes nothing.

Each case runs ``python -m skipgpt train-router`` on random:llama in a subprocess with
``SKIPGPT_TEST_PAUSE_AT=<point>`` (``skipgpt.outputs.fault_point``), which makes the writer kill
itself at that point: between steps, inside a checkpoint write, inside the final write, between
the two renames of a swap. Then the run is resumed, and its routers must be bit-identical to
those of an uninterrupted run, or the resume must be refused in one line. A silent difference
fails the suite. Two writers on one folder: the second is refused, naming the first's pid.
An --overwrite killed mid-swap leaves the old model or the new one, never a mix. Torn and
foreign checkpoints are refused; one from before manifests resumes with a warning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from skipgpt.outputs import recover_dir

ARGS = ["--model", "random:llama", "--seq-len", "16", "--max-blocks", "4", "--batch-size", "2"]
ARGS += ["--max-steps", "3", "--save-every", "1", "--calibrate-blocks", "0"]
STEPS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("SKIPGPT_TEST_PAUSE_AT", None)
ENV.pop("SKIPGPT_TEST_PAUSE_SECONDS", None)

# (point, what it interrupts); the final folder is named "out", hence swap:out:*
KILL_POINTS = [
    ("step#2", "between steps 1 and 2"),
    ("checkpoint:files#2", "inside the 2nd checkpoint write (weights+optimizer written, no state)"),
    ("swap:checkpoint:between#2", "2nd checkpoint: old one moved aside, new one not yet in"),
    ("final:files", "inside the final write (routers written, no config)"),
    ("swap:out:between", "final write: old folder moved aside, new one not yet in"),
]


def train(out: Path, text: Path, *flags: str, point: str | None = None, timeout: int = 180):
    env = dict(ENV)
    if point:
        env["SKIPGPT_TEST_PAUSE_AT"] = point
    argv = [sys.executable, "-m", "skipgpt", "train-router", *ARGS, "--dataset", str(text)]
    return subprocess.run(
        [*argv, "--output", str(out), *flags], env=env, capture_output=True, text=True, timeout=timeout
    )


def error_line(proc) -> str | None:
    """The one ``error: ...`` line of a refused run (status 2), else None."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    return errors[0] if proc.returncode == 2 and len(errors) == 1 else None


def routers_bits(path: Path) -> dict[str, bytes]:
    """Every router tensor's raw bits (the file's bytes are not comparable: safetensors writes
    its metadata entries in a per-process hash order)."""
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in load_file(str(path)).items()}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text) -> Path:
    """An uninterrupted run: what every interrupted one must end with, bit for bit. It keeps its
    checkpoint (a finished output drops it by default) for the tests that tear it."""
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = train(out, text, "--keep-checkpoint")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _kill_and_resume(point: str, root: Path, text: Path, reference: Path) -> dict:
    out = root / "out"
    killed = train(out, text, point=point)
    row = {"point": point, "killed": killed.returncode == -9}
    # never a mixed folder: a config only with its routers
    row["mixed"] = (out / "skipgpt_config.json").exists() != (out / "routers.safetensors").exists()
    resumed = train(out, text, "--resume")
    line = error_line(resumed)
    if line is not None and "no checkpoint to resume from" in line:
        row["via"] = "no checkpoint: fresh run"
        resumed = train(out, text)
        line = error_line(resumed)
    else:
        row["via"] = "--resume"
    if resumed.returncode == 0:
        same = routers_bits(out / "routers.safetensors") == routers_bits(reference / "routers.safetensors")
        row["outcome"] = "identical" if same else "DIVERGED"
    elif line is not None:
        row["outcome"] = f"refused: {line}"
    else:
        row["outcome"] = f"FAILED (status {resumed.returncode}): {resumed.stderr[-500:]}"
    row["stale"] = hidden(root) + [f"out/{n}" for n in hidden(out)] + hidden(out / "checkpoint")
    return row


def test_a_kill_at_any_point_then_resume_gives_the_same_routers_or_a_refusal(tmp_path, text, reference):
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = []
        for i, (point, _) in enumerate(KILL_POINTS):
            (tmp_path / str(i)).mkdir()
            futures.append(pool.submit(_kill_and_resume, point, tmp_path / str(i), text, reference))
        rows = [f.result() for f in futures]
    print("\n| kill point | interrupts | killed | resumed by | outcome | stale temps after |")
    print("|---|---|---|---|---|---|")
    for (_, what), r in zip(KILL_POINTS, rows, strict=True):
        print(
            f"| {r['point']} | {what} | {r['killed']} | {r['via']} | {r['outcome']} | {r['stale'] or '-'} |"
        )
    diverged = [r for r in rows if not (r["outcome"] == "identical" or r["outcome"].startswith("refused"))]
    print(f"silent divergences: {len(diverged)} of {len(rows)}")
    assert all(r["killed"] for r in rows), rows
    assert not any(r["mixed"] for r in rows), rows
    assert not diverged, diverged
    assert not any(r["stale"] for r in rows), rows  # the resumed run removed what the kill left


@pytest.mark.parametrize("point", ["final:files", "swap:out:between"])
def test_overwrite_killed_mid_write_leaves_the_old_model_or_the_new_one(tmp_path, text, reference, point):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    routers = load_file(str(out / "routers.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in routers.items()}, str(out / "routers.safetensors"))
    config = json.loads((out / "skipgpt_config.json").read_text())
    config["metadata"]["old"] = True
    (out / "skipgpt_config.json").write_text(json.dumps(config))
    old_routers = routers_bits(out / "routers.safetensors")

    assert train(out, text, "--overwrite", point=point).returncode == -9
    recover_dir(out)  # what the next run does first
    now = routers_bits(out / "routers.safetensors")
    assert now in (old_routers, routers_bits(reference / "routers.safetensors"))
    is_old = now == old_routers
    assert ("old" in json.loads((out / "skipgpt_config.json").read_text())["metadata"]) == is_old  # no mix
    assert is_old == (point == "final:files")
    assert hidden(out) == []
    assert hidden(tmp_path) == [".out.lock"]  # the dead writer's lock file, unlocked: the next writer's


def test_a_second_writer_is_refused_naming_the_first(tmp_path, text):
    out = tmp_path / "out"
    # paused far longer than the three refusals take even on a loaded 2-core machine (each starts a
    # Python with torch); the first writer is killed as soon as they are done
    env = {**ENV, "SKIPGPT_TEST_PAUSE_AT": "step#2", "SKIPGPT_TEST_PAUSE_SECONDS": "900"}
    argv = [sys.executable, "-m", "skipgpt", "train-router", *ARGS, "--dataset", str(text)]
    first = subprocess.Popen(
        [*argv, "--output", str(out)], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        for line in first.stderr:  # wait until it is writing (one checkpoint done, paused in step 2)
            if "paused at step" in line:
                break
        else:
            pytest.fail("the first writer never paused")
        for flags in ([], ["--resume"], ["--overwrite"]):
            second = train(out, text, *flags)
            assert error_line(second) == (
                f"error: {out} is being written by another skipgpt run (pid {first.pid}); wait for it "
                "to finish or give another --output"
            ), second.stderr[-1000:]
    finally:
        first.kill()
        first.wait()


def _finished_copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


def test_torn_or_foreign_checkpoints_are_refused_in_one_line(tmp_path, text, reference, capsys):
    from skipgpt.cli import main

    argv = ["train-router", *ARGS, "--dataset", str(text), "--resume", "--output"]
    torn = _finished_copy(reference, tmp_path / "torn")
    state = json.loads((torn / "checkpoint" / "trainer_state.json").read_text())
    state["step"] = 2  # the state of another step beside these weights (the torn checkpoint)
    (torn / "checkpoint" / "trainer_state.json").write_text(json.dumps(state))
    foreign = _finished_copy(reference, tmp_path / "foreign")
    other = load_file(str(foreign / "checkpoint" / "trainable.safetensors"))
    save_file({k: v + 1 for k, v in other.items()}, str(foreign / "checkpoint" / "trainable.safetensors"))
    for out, why in [
        (torn, r"trainer_state.json has \d+ bytes, the manifest says \d+"),
        (foreign, r"trainable.safetensors differs from the manifest \(sha256\)"),
    ]:
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert main([*argv, str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.fullmatch(
            rf"error: checkpoint {out}/checkpoint is torn or foreign \({why}\); resuming it would "
            "continue from a state no run had: pass --overwrite to start again",
            err[0],
        ), err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_checkpoint_without_manifest_resumes_with_a_warning(tmp_path, text, reference):
    """Folders written before manifests existed stay resumable (their files cannot be checked)."""
    from skipgpt.cli import main

    out = _finished_copy(reference, tmp_path)
    (out / "checkpoint" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="has no manifest.json"):
        assert main(["train-router", *ARGS, "--dataset", str(text), "--resume", "--output", str(out)]) == 0
    assert routers_bits(out / "routers.safetensors") == routers_bits(reference / "routers.safetensors")
