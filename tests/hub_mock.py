"""A file-backed stand-in for the Hugging Face Hub: no network, one folder per repo and commit.

``install(root)`` replaces the ``huggingface_hub`` functions skipgpt calls (``create_repo``,
``upload_folder``, ``snapshot_download``, ``hf_hub_download``) by ones that keep repos under
``root``: ``root/<org>/<name>/commits/<sha>/`` holds the files of each commit (an upload adds to
the previous commit's files, as the Hub does), ``root/<org>/<name>/refs/<branch>`` the commit a
branch points at. ``skipgpt.hub`` then sees a reachable Hub. Another process calls ``install``
with the same ``root`` to see the same repos. Returns a function that undoes the patch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

__all__ = ["install", "commits"]


class _Response:
    """The least an ``HfHubHTTPError`` reads of a response."""

    headers: dict = {}
    request = None
    status_code = 404


def _repo(root: Path, repo_id: str) -> Path:
    from huggingface_hub.errors import RepositoryNotFoundError

    path = root / repo_id
    if not (path / "refs").is_dir():
        raise RepositoryNotFoundError(
            f"404 Client Error: repository {repo_id} not found", response=_Response()
        )
    return path


def _commit_dir(root: Path, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub.errors import RevisionNotFoundError

    repo = _repo(root, repo_id)
    ref = repo / "refs" / (revision or "main")
    sha = ref.read_text().strip() if ref.is_file() else revision
    folder = repo / "commits" / str(sha)
    if not folder.is_dir():
        raise RevisionNotFoundError(f"404 Client Error: revision {revision} not found", response=_Response())
    return folder


def commits(root: str | Path, repo_id: str) -> list[str]:
    """The commits of ``repo_id``, oldest first."""
    log = Path(root) / repo_id / "log"
    return log.read_text().split() if log.is_file() else []


def install(root: str | Path):
    import huggingface_hub

    import skipgpt.hub

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def create_repo(repo_id, *, private=None, token=None, exist_ok=False, **kwargs):
        refs = root / repo_id / "refs"
        if refs.is_dir() and not exist_ok:
            raise ValueError(f"repo {repo_id} exists")
        refs.mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id, url=f"file://{root / repo_id}")

    def upload_folder(
        *, repo_id, folder_path, commit_message=None, revision=None, ignore_patterns=(), **kwargs
    ):
        repo = _repo(root, repo_id)
        branch = revision or "main"
        new = repo / "commits" / ".incoming"
        shutil.rmtree(new, ignore_errors=True)
        ref = repo / "refs" / branch
        if ref.is_file():
            shutil.copytree(repo / "commits" / ref.read_text().strip(), new)
        else:
            new.mkdir(parents=True)
        src = Path(folder_path)
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src).as_posix()
            if f.is_dir() or any(fnmatch.fnmatch(rel, p) for p in ignore_patterns or ()):
                continue
            (new / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, new / rel)
        h = hashlib.sha1((commit_message or "").encode())
        for f in sorted(new.rglob("*")):
            if f.is_file():
                h.update(f.relative_to(new).as_posix().encode() + f.read_bytes())
        sha = h.hexdigest()
        if (repo / "commits" / sha).exists():
            shutil.rmtree(new)
        else:
            new.rename(repo / "commits" / sha)
        ref.write_text(sha)
        with open(repo / "log", "a") as log:
            log.write(sha + "\n")
        return SimpleNamespace(oid=sha, commit_url=f"file://{repo}/commits/{sha}")

    def snapshot_download(repo_id, *, revision=None, local_files_only=False, **kwargs):
        return str(_commit_dir(root, repo_id, revision))

    def hf_hub_download(repo_id, filename, *, revision=None, local_files_only=False, **kwargs):
        from huggingface_hub.errors import LocalEntryNotFoundError

        path = _commit_dir(root, repo_id, revision) / filename
        if not path.is_file():
            raise LocalEntryNotFoundError(f"{filename} not found in {repo_id}")
        return str(path)

    patched = {
        (huggingface_hub, "create_repo"): create_repo,
        (huggingface_hub, "upload_folder"): upload_folder,
        (huggingface_hub, "snapshot_download"): snapshot_download,
        (huggingface_hub, "hf_hub_download"): hf_hub_download,
        (skipgpt.hub, "hub_reachable"): lambda *a, **k: True,
    }
    old = {key: getattr(*key) for key in patched}
    for (module, name), fn in patched.items():
        setattr(module, name, fn)

    def undo() -> None:
        for (module, name), fn in old.items():
            setattr(module, name, fn)

    return undo
