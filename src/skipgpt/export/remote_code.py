"""The Hugging Face side of an exported folder: stock weights, ``config.json`` with ``auto_map``, the
remote code (``skipgpt.modeling_skipgpt`` and the core modules it imports), a model card.

``write_hf_folder`` writes what plain transformers reads::

    config.json            the stock config + "auto_map" (routed only) + "skipgpt" (the routing record)
    model.safetensors      the stock model's state dict (tied weights once), written here with
                           safetensors: a model loaded from GGUF cannot ``save_pretrained``
    generation_config.json, tokenizer files
    modeling_skipgpt.py    + its relative-import closure (``code_closure``), copied flat and
                           unchanged: the core modules import each other relatively, so beside
                           each other they are the same code skipgpt runs
    README.md              what loads with and without remote code

The closure is computed from the sources (``ast``), so a core module that starts importing
another is shipped with it; an import that cannot be shipped flat (a sub-package, ``..``) is
refused in one line instead of producing a folder that fails to load.
"""

from __future__ import annotations

import ast
import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import SkipGPTError
from ..modeling_skipgpt import AUTO_MAP, CONFIG_KEY

__all__ = [
    "ENTRY_MODULE",
    "WEIGHTS_NAME",
    "code_closure",
    "write_remote_code",
    "write_hf_folder",
    "stock_state_dict",
]

ENTRY_MODULE = "modeling_skipgpt"
WEIGHTS_NAME = "model.safetensors"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # src/skipgpt: the core modules


def _relative_imports(path: Path) -> set[str]:
    """The sibling modules ``path`` imports relatively (anywhere in the file, as transformers scans)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        if node.level > 1 or (node.module and "." in node.module):
            raise SkipGPTError(
                f"{path.name} imports {'.' * node.level}{node.module or ''}: the export's remote code can "
                "only ship sibling core modules (from .name import ...)"
            )
        names |= {node.module} if node.module else {a.name for a in node.names}
    return names


def code_closure(entry: str = ENTRY_MODULE, package: Path = PACKAGE_DIR) -> list[Path]:
    """The files of ``entry`` and of every sibling module it imports relatively, transitively."""
    seen: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = package / f"{name}.py"
        if not path.is_file():
            raise SkipGPTError(f"the export's remote code imports {name!r}, which is not a core module file")
        seen[name] = path
        todo.extend(_relative_imports(path) - set(seen))
    return sorted(seen.values())


def write_remote_code(folder: Path) -> list[str]:
    """Copy ``modeling_skipgpt.py`` and its closure into ``folder``; returns the file names."""
    files = code_closure()
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return [f.name for f in files]


def stock_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as plain transformers loads it: CPU, contiguous, and a tensor shared
    by several names (tied embeddings) under its first name only."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def write_hf_folder(
    folder: Path, model: nn.Module, tokenizer, routing: dict[str, Any] | None, card: str
) -> None:
    """Write the plain HF model ``model`` (its layers not routed) into ``folder``.

    ``routing``: the routing record (``config.json``'s ``"skipgpt"``: router config with θ, removed
    modules, ...); with it, ``auto_map`` and the remote code are written so that
    ``trust_remote_code=True`` loads the routed model. ``card``: the text of ``README.md``.
    """
    save_file(stock_state_dict(model), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    for attr in ("auto_map", CONFIG_KEY):
        if hasattr(config, attr):
            delattr(config, attr)
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":  # the weights written are dequantised
        delattr(config, "quantization_config")
    if routing is not None:
        config.auto_map = dict(AUTO_MAP)
        setattr(config, CONFIG_KEY, routing)
        write_remote_code(folder)
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(card, encoding="utf-8")
