"""Writing outputs so that nothing is ever half-written: temp file + rename, checked folders."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .config import CONFIG_NAME
from .errors import SkipGPTError

__all__ = ["atomic_path", "write_json_atomic", "prepare_output_dir", "staged_dir"]


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; outputs get the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def prepare_output_dir(path: str | Path, *, allow_existing_ours: bool = True) -> Path:
    """Refuse an output folder that exists, is not empty and is not a skipgpt folder."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise SkipGPTError(f"output {path} exists and is a file; give a new or a skipgpt output folder")
        ours = (path / CONFIG_NAME).exists() or (path / "checkpoint" / "trainer_state.json").exists()
        if any(path.iterdir()) and not ours:
            raise SkipGPTError(
                f"output folder {path} exists and is not a skipgpt folder (no {CONFIG_NAME}); "
                "give a new folder or an earlier skipgpt output"
            )
        if ours and not allow_existing_ours:
            raise SkipGPTError(f"output folder {path} already holds a skipgpt model; give a new folder")
    return path


@contextlib.contextmanager
def staged_dir(path: str | Path):
    """Yield a temp folder beside ``path``; on success its files replace those in ``path``.

    Files are moved one by one with ``os.replace`` (each atomic); on failure the stage is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(stage, 0o777 & ~_UMASK)
    try:
        yield stage
        if not path.exists():
            os.replace(stage, path)
            return
        for item in sorted(stage.iterdir(), key=lambda p: p.name == CONFIG_NAME):  # config last
            target = path / item.name
            if target.is_dir() and item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
