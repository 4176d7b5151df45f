"""A crash in the middle of a staged write (``skipgpt.outputs.staged_dir``) changes nothing on disk.

The earlier folder stays byte-identical and no temp folder is left beside it, whether the
crash is an exception or Ctrl-C, in the bare context manager or in the writers built on it
(``SkipGPTModel.save_pretrained``, the training checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import routed

from skipgpt.outputs import staged_dir


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``, hidden ones included (relative path -> bytes, None = folder)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def earlier_output(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "skipgpt_config.json").write_text('{"router_config": {}}\n')
    (path / "routers.safetensors").write_bytes(bytes(range(256)) * 4)
    (path / "checkpoint").mkdir()
    (path / "checkpoint" / "trainer_state.json").write_text('{"step": 3}\n')


def fill(stage: Path) -> None:
    """What a writer puts into the stage before it crashes: new versions and a new file."""
    (stage / "routers.safetensors").write_bytes(b"new weights")
    (stage / "checkpoint").mkdir()
    (stage / "checkpoint" / "trainer_state.json").write_text('{"step": 4}\n')
    (stage / "extra.json").write_text("{}\n")


class Crash(Exception):
    pass


@pytest.mark.parametrize("error", [Crash, KeyboardInterrupt])
def test_crash_inside_the_block_leaves_the_earlier_folder_and_no_temp(tmp_path, error):
    out = tmp_path / "model"
    earlier_output(out)
    (tmp_path / "neighbour.txt").write_text("not ours\n")
    before = snapshot(tmp_path)
    with pytest.raises(error):
        with staged_dir(out) as stage:
            assert stage.parent == tmp_path and stage.exists()
            fill(stage)
            raise error()
    assert not stage.exists()
    assert snapshot(tmp_path) == before  # the folder byte-identical, nothing left beside it


def test_crash_writing_a_new_folder_leaves_nothing(tmp_path):
    out = tmp_path / "sub" / "model"
    with pytest.raises(Crash):
        with staged_dir(out) as stage:
            fill(stage)
            raise Crash()
    assert not out.exists()
    assert snapshot(tmp_path) == {"sub": None}  # the parent it made, empty: no temp folder


def test_a_finished_write_replaces_the_files_and_leaves_no_temp(tmp_path):
    out = tmp_path / "model"
    earlier_output(out)
    with staged_dir(out) as stage:
        fill(stage)
    got = snapshot(tmp_path)
    assert set(got) == {"model", *(f"model/{k}" for k in snapshot(out))}  # no temp folder beside it
    assert (out / "routers.safetensors").read_bytes() == b"new weights"
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text()) == {"step": 4}
    assert (out / "skipgpt_config.json").read_text() == '{"router_config": {}}\n'  # not in the stage: kept
    assert (out / "extra.json").exists()


def test_save_pretrained_crashing_midway_keeps_the_earlier_model(tmp_path, monkeypatch):
    import skipgpt.model as model_mod

    model, _ = routed("llama")
    out = tmp_path / "routed"
    model.save_pretrained(out, metadata={"run": 1})
    before = snapshot(tmp_path)
    with torch.no_grad():
        for p in model.router_parameters():
            p.add_(1.0)  # a different model to save
    real_save_file = model_mod.save_file

    def save_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)  # the new weights are in the stage ...
        raise OSError("No space left on device")  # ... when the disk fills up

    monkeypatch.setattr(model_mod, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(out, metadata={"run": 2})
    assert snapshot(tmp_path) == before


def test_checkpoint_crashing_midway_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    from skipgpt.train import loop

    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ckpt = tmp_path / "out" / "checkpoint"
    loop._save_checkpoint(ckpt, {"w": p}, optimizer, scheduler, {"step": 1})
    before = snapshot(tmp_path)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the optimizer state is written

    monkeypatch.setattr(loop.torch, "save", fail)
    with torch.no_grad():
        p.mul_(2)
    with pytest.raises(KeyboardInterrupt):
        loop._save_checkpoint(ckpt, {"w": p}, optimizer, scheduler, {"step": 2})
    assert snapshot(tmp_path) == before


def test_a_swap_cut_between_its_renames_is_finished_by_recover_dir(tmp_path):
    """The state a kill leaves between the two renames: the old folder aside, the new one complete."""
    from skipgpt.outputs import recover_dir

    out = tmp_path / "model"
    earlier_output(out)
    (tmp_path / ".model.ready-abc123.tmp").mkdir()
    fill(tmp_path / ".model.ready-abc123.tmp")
    out.rename(tmp_path / ".model.old-def456.tmp")
    (tmp_path / ".model.stage-zzz999.tmp").mkdir()  # a stage a later kill left
    done = recover_dir(out)
    assert done[0] == "restored model from an interrupted write"
    assert (out / "routers.safetensors").read_bytes() == b"new weights"
    assert sorted(snapshot(tmp_path)) == sorted(["model", *(f"model/{k}" for k in snapshot(out))])


def test_a_second_writer_of_a_folder_is_refused_naming_the_holder(tmp_path):
    import os

    from skipgpt.errors import SkipGPTError
    from skipgpt.outputs import OutputLock

    first = OutputLock(tmp_path / "model").acquire()
    try:
        with pytest.raises(
            SkipGPTError, match=rf"is being written by another skipgpt run \(pid {os.getpid()}\)"
        ):
            OutputLock(tmp_path / "model").acquire()
    finally:
        first.release()
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock
    OutputLock(tmp_path / "model").acquire().release()
