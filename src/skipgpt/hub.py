"""Routers on the Hugging Face Hub, peft style: download a skipgpt repo, push a folder, its card.

A skipgpt Hub repo is a skipgpt output folder (``skipgpt.checkpoint``) uploaded as it is:
``skipgpt_config.json`` + ``routers.safetensors`` (+ ``adapter/``) + a model card ``README.md``
(``library_name: skipgpt``, ``base_model:``). Its base model is recorded by Hub id (or as
``random:<arch>``), so that the repo loads anywhere; a folder whose base is a local path is
refused by ``push_folder`` unless another base is named.

Every call goes through ``huggingface_hub`` (``snapshot_download``, ``hf_hub_download``,
``create_repo``, ``upload_folder``), looked up on the module at call time so that tests can stand a
file-backed mock in for the Hub. Failures are one-line ``SkipGPTError``s naming the repo id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .assets import hub_reachable
from .checkpoint import CONFIG_NAME, FolderRecord
from .errors import SkipGPTError

__all__ = [
    "CARD_NAME",
    "LIBRARY_NAME",
    "is_hub_id",
    "is_skipgpt_repo",
    "download",
    "push_folder",
    "model_card",
    "write_model_card",
]

CARD_NAME = "README.md"
LIBRARY_NAME = "skipgpt"
# org/name (the Hub's own rule, loosely): what a skipgpt repo id looks like
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# what never goes to the Hub: the training checkpoint, hidden temp entries, locks
UPLOAD_IGNORE = ["checkpoint/*", ".*"]


def is_hub_id(spec: str | Path) -> bool:
    """Whether ``spec`` reads as a Hub repo id (``org/name``) and names no local file or folder."""
    text = str(spec).strip()
    return bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def is_skipgpt_repo(repo_id: str, revision: str | None = None) -> bool:
    """Whether the Hub repo ``repo_id`` holds ``skipgpt_config.json`` (in the local cache, or on
    the Hub when it is reachable). A plain model repo, a missing repo or an unreachable Hub: False,
    so that the caller loads the id as a plain Hugging Face model, as before."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if not is_hub_id(repo_id):
        return False
    try:
        huggingface_hub.hf_hub_download(repo_id, CONFIG_NAME, revision=revision, local_files_only=True)
        return True
    except (EntryNotFoundError, OSError, ValueError):  # not cached (or no such file)
        pass
    if _offline() or not hub_reachable():
        return False
    try:
        huggingface_hub.hf_hub_download(repo_id, CONFIG_NAME, revision=revision)
        return True
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError):  # not found, no file, no access
        return False


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of the skipgpt repo ``repo_id`` at ``revision`` (``snapshot_download``).

    From the Hub when it is reachable (and ``HF_HUB_OFFLINE`` is not set), else from the local
    cache; refused in one line naming the id when neither has it."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    at = f"'{repo_id}'" + (f" (revision {revision})" if revision else "")
    online = not _offline() and hub_reachable()
    try:
        folder = Path(
            huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=not online)
        )
    except LocalEntryNotFoundError:
        raise SkipGPTError(
            f"cannot download skipgpt repo {at}: not in the local Hugging Face cache and the Hub is "
            + ("offline (HF_HUB_OFFLINE)" if _offline() else "unreachable")
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SkipGPTError(f"cannot download skipgpt repo {at}: {_one_line(exc)}") from None
    if not (folder / CONFIG_NAME).is_file():
        raise SkipGPTError(f"Hub repo {at} is not a skipgpt repo (no {CONFIG_NAME}); load it as a base model")
    return folder


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload the skipgpt folder ``folder`` to it as one commit
    (its ``checkpoint/`` and hidden entries left out); returns the commit's URL."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    if not _REPO_ID.match(str(repo_id)):
        raise SkipGPTError(f"repo_id must be 'org/name', got {repo_id!r}")
    try:
        huggingface_hub.create_repo(repo_id, private=private, token=token, exist_ok=True)
        info = huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message or "Upload skipgpt routers",
            token=token,
            revision=revision,
            ignore_patterns=UPLOAD_IGNORE,
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SkipGPTError(f"cannot push to Hub repo '{repo_id}': {_one_line(exc)}") from None
    return str(getattr(info, "commit_url", info))


# -- the model card -------------------------------------------------------------------------------
def _card_base_model(base: str | None) -> str | None:
    """The base model as the card's ``base_model:`` metadata (a Hub id only)."""
    return base if base and _REPO_ID.match(base) else None


def _command(metadata: dict[str, Any]) -> str:
    if metadata.get("command"):
        return str(metadata["command"])
    return "not recorded (saved from Python)"


def _sparsity_lines(record: FolderRecord) -> list[str]:
    cal = record.metadata.get("threshold_calibration") or {}
    after = cal.get("sparsity_after") or {}
    lines = []
    if record.router_config is not None:
        rc = record.router_config
        lines.append(f"- target sparsity: {rc.target_sparsity} ({rc.budget} budget), θ = {rc.threshold:.4g}")
    if after:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in after.items())
        lines.append(f"- realised sparsity on {cal.get('blocks')} calibration blocks: {parts}")
    for key in ("ppl", "perplexity", "eval"):
        if key in record.metadata:
            lines.append(f"- {key}: {record.metadata[key]}")
    if not any(k in record.metadata for k in ("ppl", "perplexity", "eval")):
        lines.append("- perplexity: not recorded (`skipgpt eval ppl --model <this repo> --dataset ...`)")
    return lines


def _recipe_lines(metadata: dict[str, Any]) -> list[str]:
    """What training recorded of its recipe: stage, loss weights, curriculum, steps, lr, data."""
    tuning, loop = metadata.get("router_tuning") or {}, metadata.get("loop") or {}
    lines = [f"- stage: {metadata['stage']}"] if metadata.get("stage") else []
    keys = ("lm_weight", "distill_weight", "distill_temperature", "curriculum")
    if tuning:
        lines.append("- loss: " + ", ".join(f"{k} {tuning[k]}" for k in keys if k in tuning))
    if loop:
        keys = ("max_steps", "batch_size", "lr", "lr_scheduler", "seed")
        lines.append("- loop: " + ", ".join(f"{k} {loop[k]}" for k in keys if k in loop))
    if metadata.get("dataset"):
        lines.append(
            f"- data: {metadata['dataset']} ({metadata.get('blocks')} blocks of {metadata.get('seq_len')})"
        )
    return lines or ["- not recorded"]


def model_card(record: FolderRecord, repo_id: str | None = None):
    """A ``huggingface_hub.ModelCard`` for the skipgpt folder of ``record``: card data with
    ``library_name: skipgpt`` and ``base_model:``, then base model, router config, sparsity, PPL
    (if recorded) and the command that made it."""
    from huggingface_hub import ModelCard, ModelCardData

    base = record.base_model
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=_card_base_model(base),
        tags=["skipgpt", "token-routing", "conditional-computation", record.kind],
        pipeline_tag="text-generation",
    )
    name = repo_id or (record.folder.name if record.folder is not None else "skipgpt routers")
    config = record.router_config.to_dict() if record.router_config is not None else None
    config_lines = "\n".join(f"| `{k}` | `{v}` |" for k, v in (config or {}).items())
    load = repo_id or "<this repo>"
    text = f"""---
{data.to_yaml()}
---

# {name}

skipgpt routers ({record.kind}) for **{base}**: a per-token router before the attention and
the MLP of every decoder layer decides which tokens each module runs for; skipped work is
really not computed.

```python
from skipgpt import SkipGPTModel

model = SkipGPTModel.from_pretrained("{load}")  # downloads the base model {base}
```

or `skipgpt generate --model {load} --prompt "..."`.

## Base model

`{base}` ({record.model_type}, {record.num_layers} layers, hidden {record.hidden_size})

## Sparsity and quality

{chr(10).join(_sparsity_lines(record))}

## Router config

| field | value |
|---|---|
{config_lines}

## How it was made

{chr(10).join(_recipe_lines(record.metadata))}

```
{_command(record.metadata)}
```

skipgpt {record.skipgpt_version}, folder format {record.format_version}.
"""
    return ModelCard(text)


def write_model_card(folder: str | Path, record: FolderRecord, repo_id: str | None = None) -> Path:
    """Write ``model_card(record)`` as ``folder/README.md``; returns the file."""
    path = Path(folder) / CARD_NAME
    model_card(record, repo_id).save(str(path))
    return path
