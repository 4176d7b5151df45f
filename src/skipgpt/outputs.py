"""Writing outputs so that nothing is ever half-written or mixed, and one writer per folder.

* ``atomic_path``: one file, written beside its target and renamed onto it.
* ``staged_dir``: a whole folder, written complete beside its target and swapped in with two
  renames (the old folder aside, the new one in place), never file by file. A kill at any
  moment leaves either the old folder or the new one (``recover_dir`` finishes or undoes a
  swap that a kill cut between its two renames).
* ``OutputLock``: an advisory lock (``filelock``) beside an output folder, held by a run for
  as long as it writes there; a second writer is refused in one line naming the holder's pid.
  The run that takes the lock also recovers an interrupted swap and removes stale stages.
* ``fault_point``: the fault-injection hook the crash tests use (``tests/test_faults.py``).

Names beside a folder ``P`` (all hidden, all removed by ``recover_dir``): ``.P.stage-*.tmp`` (a
stage being written), ``.P.ready-*.tmp`` (complete, about to be swapped in), ``.P.old-*.tmp``
(the previous ``P``, deleted once the new one is in place), ``.P.lock`` (the lock, removed
when released).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .config import CONFIG_NAME
from .errors import SkipGPTError

__all__ = [
    "atomic_path",
    "write_json_atomic",
    "prepare_output_dir",
    "staged_dir",
    "swap_in",
    "recover_dir",
    "OutputLock",
    "lock_output",
    "release_output",
    "lock_until_saved",
    "holds_output",
    "fault_point",
]


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# -- fault injection (tests only) ---------------------------------------------------------------
_FAULT_ENV = "SKIPGPT_TEST_PAUSE_AT"
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: crash or pause here when ``SKIPGPT_TEST_PAUSE_AT`` names this point.

    ``SKIPGPT_TEST_PAUSE_AT=<name>[#<n>]`` acts at the n-th time (default 1st) the writer
    reaches ``name``: it kills its own process with SIGKILL (no cleanup, no ``finally``: what a
    power cut or OOM kill leaves), or, when ``SKIPGPT_TEST_PAUSE_SECONDS`` is set, prints
    ``paused at <name>`` to stderr and sleeps that long (a live writer for the concurrency
    tests). Unset (always, outside the tests) it costs one dictionary lookup.
    """
    want = os.environ.get(_FAULT_ENV)
    if not want:
        return
    point, _, nth = want.partition("#")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] != int(nth or 1):
        return
    pause = os.environ.get("SKIPGPT_TEST_PAUSE_SECONDS")
    if pause:
        print(f"paused at {name}", file=sys.stderr, flush=True)
        time.sleep(float(pause))
        return
    os.kill(os.getpid(), signal.SIGKILL)


# -- single files -------------------------------------------------------------------------------
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


# -- whole folders ------------------------------------------------------------------------------
def _fsync_tree(root: Path) -> None:
    """Flush every file of ``root`` (and the folders) to disk, so that a rename that makes it
    current never points at data a power cut would lose. A kill alone does not need it."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` made of hard links (a full copy where links fail).

    Links cost nothing and share the bytes; that is safe because skipgpt never changes a
    written file in place (every write is a new file and a rename)."""
    if src.is_dir() and not src.is_symlink():
        dst.mkdir()
        for item in src.iterdir():
            _link_tree(item, dst / item.name)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _is_stale_name(name: str) -> bool:
    """A hidden temp entry of ours inside a folder (a stage, an atomic file) left by a kill."""
    return name.startswith(".") and name.endswith(".tmp")


def swap_in(stage: Path, path: Path, *, keep_old: bool | tuple[str, ...] = True, drop: tuple = ()) -> None:
    """Make the complete folder ``stage`` (beside ``path``) the folder ``path``, in one swap.

    ``keep_old``: entries of the old ``path`` that the stage does not have are carried into it
    (as hard links) first, e.g. the training checkpoint beside a final model: True = all but
    those named in ``drop``, a tuple = only those names, False = none. Hidden temp entries are
    never carried. Then: the stage is renamed ``.P.ready-*`` (complete), the old folder to
    ``.P.old-*``, the ready one to ``path``, and the old one is deleted. A kill between any two
    steps leaves a state ``recover_dir`` resolves to the old or the new folder, never a mix.
    A lock this process holds on ``path`` (``lock_output``) is released once the new folder is in.
    """
    path = Path(path)
    if path.is_dir() and keep_old:
        for item in path.iterdir():
            name = item.name
            wanted = name not in drop if keep_old is True else name in keep_old
            if wanted and not _is_stale_name(name) and not (stage / name).exists():
                _link_tree(item, stage / name)
    _fsync_tree(stage)
    suffix = stage.name.rsplit("stage-", 1)[-1] if "stage-" in stage.name else "x.tmp"
    ready = stage.with_name(f".{path.name}.ready-{suffix}")
    os.replace(stage, ready)
    fault_point(f"swap:{path.name}:ready")
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", suffix=".tmp", dir=path.parent))
        os.replace(path, old)  # onto the empty folder mkdtemp reserved (a unique name)
        fault_point(f"swap:{path.name}:between")
    os.replace(ready, path)
    _fsync_dir(path.parent)
    fault_point(f"swap:{path.name}:done")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    release_output(path)  # the final write of a locked run: the folder is complete, others may go on


def _new_stage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.stage-", suffix=".tmp", dir=path.parent))
    os.chmod(stage, 0o777 & ~_UMASK)
    return stage


@contextlib.contextmanager
def staged_dir(path: str | Path, *, keep_old: bool | tuple[str, ...] = True, drop: tuple = ()):
    """Yield an empty stage folder beside ``path``; on success it replaces ``path`` as a whole.

    What the block writes is the new folder; entries of the old one it did not write are
    carried over as ``swap_in`` says (``keep_old``, ``drop``). On failure (an exception, Ctrl-C)
    the stage is removed and ``path`` is left as it was; after a kill ``recover_dir`` cleans up.
    """
    path = Path(path)
    stage = _new_stage(path)
    try:
        yield stage
        swap_in(stage, path, keep_old=keep_old, drop=drop)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _sibling_temps(path: Path) -> dict[str, list[Path]]:
    """Hidden folders beside ``path`` that a swap of ``path`` left: by kind, newest first.

    The kinds are ``stage``, ``ready`` and ``old``; folders of the earlier file-by-file writer
    (``.P.<8 random characters>.tmp``) count as stages."""
    kinds: dict[str, list[Path]] = {"stage": [], "ready": [], "old": []}
    if not path.parent.is_dir():
        return kinds
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(stage|ready|old)-)?([A-Za-z0-9_]+)\.tmp$")
    for item in path.parent.iterdir():
        m = pattern.match(item.name)
        if m and item.is_dir() and not item.is_symlink():
            if m.group(1) is None and len(m.group(2)) != 8:
                continue  # not a name mkdtemp gave the earlier writer
            kinds[m.group(1) or "stage"].append(item)
    for items in kinds.values():
        items.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return kinds


def recover_dir(path: str | Path, accept=None, *, inside: bool = True) -> list[str]:
    """After a kill: finish or undo an interrupted swap of ``path``, delete stale stages.

    Run by a writer that holds ``path``'s lock (nobody else is swapping it). When ``path`` is
    missing, the newest complete (``ready``) folder that ``accept`` (a check, default any)
    accepts takes its place, else the newest old one goes back. Everything else beside it, and
    hidden temp entries inside it (unless ``inside`` is False: recover a sub-folder's swap first),
    are deleted. Returns what was done, one phrase per action.
    """
    path = Path(path)
    done: list[str] = []
    kinds = _sibling_temps(path)
    if not path.exists():
        for candidate in [*(p for p in kinds["ready"] if accept is None or accept(p)), *kinds["old"]]:
            os.replace(candidate, path)
            done.append(f"restored {path.name} from an interrupted write")
            break
    for items in kinds.values():
        for item in items:
            if item.exists():
                shutil.rmtree(item, ignore_errors=True)
                done.append(f"removed stale {item.name}")
    if inside and path.is_dir():
        for item in path.iterdir():
            if _is_stale_name(item.name):
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item, ignore_errors=True)
                else:
                    item.unlink(missing_ok=True)
                done.append(f"removed stale {path.name}/{item.name}")
    return done


# -- one writer per folder ----------------------------------------------------------------------
def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


class OutputLock:
    """An exclusive advisory lock on the output folder ``path`` (``filelock``, i.e. ``flock``).

    The lock file ``.P.lock`` lies beside the folder, not in it, so that it stays put while the
    folder is swapped, and it holds the holder's pid for the refusal message. The OS drops the
    lock when the holder dies (a kill leaves only an unlocked file, which the next writer
    takes); ``release`` deletes the file while still holding the lock.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = _lock_file(self.path)
        self._lock = None

    def acquire(self) -> OutputLock:
        from filelock import FileLock, Timeout

        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # the file we locked may have been deleted by a holder's release
            lock = FileLock(str(self.file), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise SkipGPTError(
                    f"{self.path} is being written by another skipgpt run ({self._holder()}); wait "
                    "for it to finish or give another --output"
                ) from None
            if self._same_file(lock):
                self._lock = lock
                self.file.write_text(f"{os.getpid()}\n")  # for the refusal message of others
                return self
            lock.release()
        raise SkipGPTError(f"could not lock {self.file}: it keeps changing; is another run starting?")

    def _same_file(self, lock) -> bool:
        """Whether the file we locked is still the one at ``self.file`` (not deleted meanwhile)."""
        fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
        if fd is None:
            return self.file.exists()
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.file))
        except OSError:
            return False

    def _holder(self) -> str:
        try:
            pid = self.file.read_text().strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else f"lock {self.file}"

    def release(self) -> None:
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            self.file.unlink()
        self._lock.release()
        self._lock = None


_held: dict[str, OutputLock] = {}


def lock_output(path: str | Path) -> OutputLock | None:
    """Take ``path``'s lock for this process (kept until ``release_output`` or exit).

    Re-entrant: a process that holds it already (the CLI command, then the training function
    it calls) gets it again. Only the main process of a distributed run locks (every rank
    claims the folder; rank 0 is the one that writes).
    """
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    key = str(Path(path).resolve())
    if key not in _held:
        _held[key] = OutputLock(path).acquire()
    return _held[key]


def holds_output(path: str | Path) -> bool:
    """Whether this process holds ``path``'s lock."""
    return str(Path(path).resolve()) in _held


def release_output(path: str | Path) -> None:
    """Release this process's lock on ``path`` (no-op when it holds none)."""
    lock = _held.pop(str(Path(path).resolve()), None)
    if lock is not None:
        lock.release()


@contextlib.contextmanager
def lock_until_saved(path: str | Path):
    """Hold ``path``'s lock for the block and after it (the writer's final swap releases it);
    release it at once if the block raises."""
    lock_output(path)
    try:
        yield
    except BaseException:
        release_output(path)
        raise


def _release_all() -> None:
    for key in list(_held):
        _held.pop(key).release()


import atexit  # noqa: E402

atexit.register(_release_all)
