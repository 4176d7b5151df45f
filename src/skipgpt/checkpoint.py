"""The skipgpt output folder: one typed record, read (old formats migrated) and written here only.

A skipgpt output folder holds ``skipgpt_config.json`` (this record) beside what it names::

    skipgpt_config.json   format version, base model spec, router config, removed modules, metadata
    routers.safetensors   the routers (absent for dense + LoRA)
    adapter/              a peft LoRA adapter (stage 2, SkipGPT-Joint, dense + LoRA)
    hf/                   an exported copy of the base model (``base_model_in_folder``; 0.1.0's export)
    checkpoint/           the training checkpoint (``--resume``), ignored by loaders

What a folder *is* (``FolderRecord.kind``) follows from the record by one ordered rule table
(``KIND_RULES``), so every loader and command agrees:

=============  ===============================================================================
kind           written by
=============  ===============================================================================
shortgpt       ``baseline shortgpt``: a plain HF folder (layers really removed) + ``shortgpt.json``
dense-lora     ``finetune-lora --dense``: no routers (``router_config: null``), an adapter
llm-drop       ``baseline llm-drop``: constant routers, ``removed_modules`` never run (with an
               adapter after ``finetune-lora`` on it)
mod            ``baseline mod``: MoD-D routers tuned under top-k, θ calibrated
routed-lora    ``finetune-lora`` (stage 2) and ``--joint``: routers + adapter
routed         ``train-router`` (stage 1): routers only; with ``--remove-layers`` also the
               ``removed_modules`` of the layers it deleted first (metadata ``layer_removal``)
=============  ===============================================================================

``export`` and ``calibrate`` write a copy of their source's kind; an exported folder is told
by its layout (``base_model_in_folder``), not by its kind. Two export layouts are read: 0.1.0's
(``base_model_in_folder: "hf"``, the HF weights in a sub-folder) and the current one
(``base_model_in_folder: "."``): the folder itself is a Hugging Face model folder
(``config.json``, ``model.safetensors``, the remote code of ``skipgpt.export``) that also holds
the record, the routers and the adapter (``exported_in_place``). The kind is not stored: it follows
from the record and the folder (an ``adapter/`` beside the routers), so it cannot disagree with them.

Formats: version 0 is skipgpt 0.1.0's (no ``format_version`` key; LLM-Drop's removed modules
inside ``metadata``); version 1 adds ``format_version`` and puts ``removed_modules`` (and the
reserved ``substitutes``) at the top level; version 2 records a local base model by its path
*relative to the folder* (``base_model_relative: true``), so that a moved folder, or one read from
another working directory, still finds it (a Hub id or ``random:<arch>`` is recorded as it is).
``read`` migrates older versions step by step (``MIGRATIONS``; a version-1 path is kept as
written: absolute, or relative to the working directory as before) and refuses a newer one in
one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .config import CONFIG_NAME, MODULES, SkipGPTConfig
from .errors import SkipGPTError
from .version import __version__

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "LAYER_REMOVAL_KEY",
    "ROUTERS_NAME",
    "ADAPTER_DIR",
    "SHORTGPT_RECORD_NAME",
    "FolderKind",
    "FOLDER_KINDS",
    "KIND_RULES",
    "MIGRATIONS",
    "FolderRecord",
    "is_skipgpt_dir",
    "is_output_dir",
    "read",
    "write",
    "resolve_base_spec",
]

FORMAT_VERSION = 2
ROUTERS_NAME = "routers.safetensors"
ADAPTER_DIR = "adapter"
SHORTGPT_RECORD_NAME = "shortgpt.json"
# metadata key of routers trained around whole layers removed first (``train-router --remove-layers``)
LAYER_REMOVAL_KEY = "layer_removal"

FolderKind = Literal["shortgpt", "dense-lora", "llm-drop", "mod", "routed-lora", "routed"]
FOLDER_KINDS: tuple[str, ...] = get_args(FolderKind)


@dataclass(frozen=True)
class FolderRecord:
    """What ``skipgpt_config.json`` says about its folder (``read`` fills ``folder`` and ``adapter``).

    ``base_model`` is the recorded spec (a local path made absolute by ``read``: on disk it is
    relative to the folder); ``base_spec`` the one to load (an exported folder's own weights).
    ``removed_modules`` are LLM-Drop's (layer, 'attn'|'mlp') pairs, ``substitutes`` says what the
    routers file also carries for skipped modules (``SkipGPTModel.substitutes_record``: modules,
    rank, activation, init, tensor prefix; None: plain skipping; the router config's
    ``*_skip_to`` fields are what rebuilds them), ``metadata`` what training recorded (data,
    losses, history, ...).
    ``format_version`` is the version the folder was written in (``read`` migrates older ones;
    ``write`` always writes ``FORMAT_VERSION``).
    """

    base_model: str | None
    router_config: SkipGPTConfig | None
    model_type: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    removed_modules: tuple[tuple[int, str], ...] = ()
    substitutes: dict[str, Any] | None = None
    base_model_in_folder: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    skipgpt_version: str | None = __version__
    adapter: str | None = None  # sub-folder holding a LoRA adapter, found on disk by ``read``
    folder: Path | None = None  # where ``read`` found the record

    @property
    def kind(self) -> FolderKind:
        return next(kind for kind, rule in KIND_RULES if rule(self))

    @property
    def routed(self) -> bool:
        """Whether the folder holds routers (``routers.safetensors``)."""
        return self.router_config is not None

    @property
    def exported(self) -> bool:
        """Whether the folder holds its own base weights (``skipgpt export``)."""
        return self.base_model_in_folder is not None

    @property
    def exported_in_place(self) -> bool:
        """Whether the folder itself is the Hugging Face model folder of its base weights
        (``skipgpt export`` since format 1: ``base_model_in_folder`` is ``"."``)."""
        return self.base_model_in_folder is not None and Path(self.base_model_in_folder) == Path(".")

    @property
    def base_spec(self) -> str:
        """The base model spec to load: the recorded one, or the exported copy inside the folder."""
        if self.base_model_in_folder:
            if self.folder is None:
                raise SkipGPTError(
                    "an exported record names its base model relative to its folder; read() it"
                )
            return str(self.folder.resolve() / self.base_model_in_folder)
        if not self.base_model:
            raise SkipGPTError(f"{self._where()} names no base model ('base_model' missing)")
        return self.base_model

    def replace(self, **changes: Any) -> FolderRecord:
        return dataclasses.replace(self, **changes)

    def to_json(self, folder: str | Path | None = None) -> dict[str, Any]:
        """The record as ``folder/skipgpt_config.json`` holds it (current format; unset optional
        keys left out). A base model that is a local path is written relative to ``folder``."""
        out: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "skipgpt_version": __version__,
            "base_model": self.base_model,
        }
        relative = _relative_base(self.base_model, folder)
        if relative is not None:
            out |= {"base_model": relative, "base_model_relative": True}
        optional = {
            "base_model_in_folder": self.base_model_in_folder,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
        }
        out |= {k: v for k, v in optional.items() if v is not None}
        out["router_config"] = self.router_config.to_dict() if self.router_config is not None else None
        out["removed_modules"] = [[i, m] for i, m in self.removed_modules]
        if self.substitutes is not None:
            out["substitutes"] = self.substitutes
        out["metadata"] = self.metadata
        return out

    def _where(self) -> str:
        return str(self.folder / CONFIG_NAME) if self.folder is not None else CONFIG_NAME


# kind -> rule, first match wins (the order matters: an LLM-Drop folder with an adapter is LLM-Drop)
KIND_RULES: tuple[tuple[FolderKind, Callable[[FolderRecord], bool]], ...] = (
    ("shortgpt", lambda r: r.router_config is None and r.metadata.get("method") == "shortgpt"),
    ("dense-lora", lambda r: r.router_config is None),
    # removed modules make a folder LLM-Drop's unless routers were trained around them (a
    # ``layer_removal`` record: ``train-router --remove-layers``)
    (
        "llm-drop",
        lambda r: (
            r.metadata.get("baseline") == "llm-drop"
            or (bool(r.removed_modules) and LAYER_REMOVAL_KEY not in r.metadata)
        ),
    ),
    ("mod", lambda r: r.metadata.get("baseline") == "mod-d"),
    ("routed-lora", lambda r: r.adapter is not None),
    ("routed", lambda r: True),
)


# -- recognising a folder -----------------------------------------------------------------------
def is_skipgpt_dir(path: str | Path) -> bool:
    """Whether ``path`` is a skipgpt output folder (it holds ``skipgpt_config.json``)."""
    try:
        return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()
    except (OSError, ValueError):
        return False


def is_output_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder some skipgpt command wrote: a skipgpt folder or a ShortGPT one."""
    return is_skipgpt_dir(path) or (Path(path) / SHORTGPT_RECORD_NAME).is_file()


# -- a local base model, relative to its folder ---------------------------------------------------
def _relative_base(base: str | None, folder: str | Path | None) -> str | None:
    """``base`` as a POSIX path relative to ``folder`` when it names an existing local file or
    folder (not a Hub id, ``random:<arch>`` or a built-in name that happens to be a file), else None."""
    if not base or folder is None or ":" in base.split("/")[0] and not Path(base).is_absolute():
        return None
    path = Path(base).expanduser()
    if not path.exists():
        return None
    return Path(os.path.relpath(path.resolve(), Path(folder).resolve())).as_posix()


def _absolute_base(raw: dict[str, Any], folder: Path) -> str | None:
    """The recorded base model with a folder-relative path made absolute (what a loader takes)."""
    base = raw.get("base_model")
    if not base or not raw.get("base_model_relative"):
        return base
    return os.path.normpath(folder.absolute() / base)


# -- migrations: version v -> v + 1, on the raw JSON object ------------------------------------
def _v0_to_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """skipgpt 0.1.0: LLM-Drop's removed modules lived in ``metadata``; no ``format_version``."""
    return {
        **raw,
        "format_version": 1,
        "removed_modules": (raw.get("metadata") or {}).get("removed_modules") or [],
    }


def _v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 2 may record a local base relative to the folder; a version-1 path (absolute, or
    relative to the working directory) is kept as it was written and read as before."""
    return {**raw, "format_version": 2, "base_model_relative": False}


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1, 1: _v1_to_v2}


def _migrate(path: Path, raw: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(version on disk, the raw record migrated to ``FORMAT_VERSION``)."""
    version = written = raw.get("format_version", 0)  # no key: skipgpt 0.1.0's folders
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise SkipGPTError(f"{path}: 'format_version' must be an integer >= 0, got {version!r}")
    if version > FORMAT_VERSION:
        raise SkipGPTError(
            f"{path} has format version {version}, newer than this skipgpt {__version__} reads "
            f"(up to {FORMAT_VERSION}); upgrade skipgpt"
        )
    while version < FORMAT_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
    return written, raw


def _removed(path: Path, value: Any) -> tuple[tuple[int, str], ...]:
    if not isinstance(value, list):
        raise SkipGPTError(f"{path}: 'removed_modules' must be a list of [layer, module], got {value!r}")
    out = []
    for item in value:
        ok = isinstance(item, list | tuple) and len(item) == 2
        if not ok or not isinstance(item[0], int) or isinstance(item[0], bool) or item[1] not in MODULES:
            raise SkipGPTError(
                f"{path}: a removed module must be [layer, one of {list(MODULES)}], got {item!r}"
            )
        out.append((item[0], item[1]))
    return tuple(sorted(out))  # by layer, attention first: one record whatever order a writer used


# -- reading and writing ------------------------------------------------------------------------
def read(folder: str | Path) -> FolderRecord:
    """The record of the output folder ``folder``, migrated to the current format.

    Refuses in one line (``SkipGPTError``) a folder without a record, a missing, corrupt or
    ill-typed ``skipgpt_config.json`` and a newer format version. A ShortGPT folder (a plain HF
    model + ``shortgpt.json``) gives a record of kind ``shortgpt`` whose base model is itself.
    """
    folder = Path(folder)
    if not is_skipgpt_dir(folder) and (folder / SHORTGPT_RECORD_NAME).is_file():
        return _read_shortgpt(folder)
    path = folder / CONFIG_NAME
    written, raw = _migrate(
        path, SkipGPTConfig.read_json(path)
    )  # read_json: missing, corrupt, ill-typed keys
    config = raw.get("router_config")
    substitutes = raw.get("substitutes")
    if substitutes is not None and not isinstance(substitutes, dict):
        raise SkipGPTError(f"{path}: 'substitutes' must be an object or null, got {substitutes!r}")
    return FolderRecord(
        base_model=_absolute_base(raw, folder),
        router_config=SkipGPTConfig.from_dict(config) if config is not None else None,
        model_type=raw.get("model_type"),
        hidden_size=raw.get("hidden_size"),
        num_layers=raw.get("num_layers"),
        removed_modules=_removed(path, raw.get("removed_modules", [])),
        substitutes=substitutes,
        base_model_in_folder=raw.get("base_model_in_folder") or None,
        metadata=raw.get("metadata") or {},
        format_version=written,
        skipgpt_version=raw.get("skipgpt_version"),
        adapter=ADAPTER_DIR if (folder / ADAPTER_DIR).is_dir() else None,
        folder=folder,
    )


def _read_shortgpt(folder: Path) -> FolderRecord:
    path = folder / SHORTGPT_RECORD_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkipGPTError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(meta, dict):
        raise SkipGPTError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    meta.setdefault("method", "shortgpt")
    return FolderRecord(
        base_model=str(folder),
        router_config=None,
        num_layers=meta.get("num_layers_after"),
        metadata=meta,
        format_version=0,  # shortgpt.json has no version: 0.1.0's
        skipgpt_version=None,
        folder=folder,
    )


def write(folder: str | Path, record: FolderRecord) -> Path:
    """Write ``record`` as ``folder/skipgpt_config.json`` (current format); returns the file.

    Only the record: routers, adapter and weights are written by their owners, and the whole
    folder is made atomic by the caller (``outputs.staged_dir``).
    """
    if record.kind == "shortgpt":
        raise SkipGPTError(
            "a ShortGPT folder is a plain HF model; save it with baselines.shortgpt.save_pruned"
        )
    path = Path(folder) / CONFIG_NAME
    path.write_text(json.dumps(record.to_json(folder), indent=2) + "\n")
    return path


def resolve_base_spec(record: dict[str, Any] | FolderRecord, folder: str | Path) -> str:
    """The base model spec of a record (a ``FolderRecord`` or the raw ``skipgpt_config.json``
    object) of ``folder``. An exported folder (``skipgpt export``) holds its own HF weights in the
    sub-folder ``base_model_in_folder``, found relative to the folder so that it can be moved."""
    if isinstance(record, FolderRecord):
        return record.replace(folder=Path(folder)).base_spec
    inside = record.get("base_model_in_folder")
    return str(Path(folder).resolve() / inside) if inside else _absolute_base(record, Path(folder))
