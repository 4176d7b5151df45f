"""Turn a skipgpt folder into a folder vLLM loads with the routed model class.

Layout of the prepared folder (default ``<skipgpt folder>/vllm``)::

    config.json            the base's HF config; ``architectures`` = ["SkipGPTLlamaForCausalLM"] and a
                           ``skipgpt`` entry (router config, θ, source folder)
    model.safetensors      the base weights, as the base model holds them (float32 by default)
    tokenizer files        the base's tokenizer (vLLM serves its chat template)
    skipgpt/               ``skipgpt_config.json`` and ``routers.safetensors``, copied unchanged; kept out
                           of the top level so that vLLM's weight glob (``*.safetensors``) and a stock
                           ``LlamaForCausalLM`` (``--dense``) never see them

The routed class reads the routers from ``skipgpt/``. A prepared folder is reused while its copy
of the routers and config equals the source's; otherwise it is rebuilt (atomically).
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..checkpoint import CONFIG_NAME, ROUTERS_NAME
from ..errors import SkipGPTError
from . import ARCHITECTURE, ROUTED_ARCHITECTURES

__all__ = ["prepare_serving_folder", "is_prepared", "ROUTERS_SUBDIR", "DEFAULT_SUBDIR", "serving_record"]

ROUTERS_SUBDIR = "skipgpt"
DEFAULT_SUBDIR = "vllm"


def serving_record(folder: str | Path) -> dict[str, Any]:
    """The ``skipgpt`` entry of a prepared folder's config.json ({} when it has none)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("skipgpt") or {}
    except (OSError, json.JSONDecodeError):
        return {}


def is_prepared(folder: str | Path) -> bool:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return ARCHITECTURE in (config.get("architectures") or []) and (folder / ROUTERS_SUBDIR).is_dir()


def _up_to_date(source: Path, out: Path) -> bool:
    if not is_prepared(out):
        return False
    return all(
        (out / ROUTERS_SUBDIR / name).exists()
        and filecmp.cmp(source / name, out / ROUTERS_SUBDIR / name, False)
        for name in (CONFIG_NAME, ROUTERS_NAME)
    )


def _save_plain_weights(base, folder: Path) -> dict[str, Any]:
    """Write ``model.safetensors`` (tied weights once) and return the HF config as a dict.

    Written by hand, not with ``save_pretrained``: a model loaded from a GGUF file carries a GGUF
    ``quantization_config`` (its weights are already de-quantised) that some transformers versions
    refuse to serialise, and that vLLM would read as a GGUF checkpoint.
    """
    from safetensors.torch import save_file

    state = base.state_dict()
    tied = getattr(base.config, "tie_word_embeddings", False)
    tensors = {k: v.detach().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(base).__name__]
    return config


# folder kind (skipgpt.checkpoint) -> why the vLLM plugin cannot serve it
_NOT_SERVED = {
    "dense-lora": "{source} has no routers (dense + LoRA); serve its merged export with vllm directly",
    "routed-lora": "{source} holds a LoRA adapter; run `skipgpt export --model {source} --merge --output DIR` "
    "and serve DIR",
    "llm-drop": "{source} is a static (LLM-Drop) baseline; the vLLM plugin serves routed models only",
}


def prepare_serving_folder(source: str | Path, output: str | Path | None = None, force: bool = False) -> Path:
    """Prepare (or reuse) the vLLM folder of the skipgpt folder ``source``; returns its path.

    ``source`` may also be a prepared folder already (returned as it is). Raises ``SkipGPTError``
    (one line) for what vLLM cannot serve with routing: a dense + LoRA folder, an unmerged LoRA
    adapter, a statically pruned baseline, or a base family without a routed vLLM class.
    """
    source = Path(source)
    if is_prepared(source):
        return source
    if not checkpoint.is_skipgpt_dir(source):
        raise SkipGPTError(
            f"{source} is neither a skipgpt output folder (no {CONFIG_NAME}) nor a prepared vLLM folder"
        )
    record = checkpoint.read(source)
    refusal = _NOT_SERVED.get("routed-lora" if record.routed and record.adapter else record.kind)
    if refusal is not None:
        raise SkipGPTError(refusal.format(source=source))
    if record.removed_modules:  # routers trained around deleted layers (train-router --remove-layers)
        raise SkipGPTError(
            f"{source} runs with {len(record.removed_modules)} modules removed; the vLLM plugin serves "
            "routed models without removed modules only"
        )
    model_type = record.model_type
    if model_type not in ROUTED_ARCHITECTURES:
        raise SkipGPTError(
            f"no routed vLLM class for model_type {model_type!r}; supported: {sorted(ROUTED_ARCHITECTURES)}"
        )
    out = Path(output) if output is not None else source / DEFAULT_SUBDIR
    if not force and _up_to_date(source, out):
        return out
    if out.exists() and any(out.iterdir()) and not is_prepared(out):
        raise SkipGPTError(
            f"{out} exists and is not a prepared vLLM folder; give --prepared-dir a new folder"
        )

    from ..outputs import staged_dir
    from ..specs import load_base_model

    config = record.router_config
    base, tokenizer = load_base_model(record.base_spec, dtype=torch.float32)
    with staged_dir(out) as stage:
        hf_config = _save_plain_weights(base, stage)
        tokenizer.save_pretrained(stage)
        hf_config["architectures"] = [ROUTED_ARCHITECTURES[model_type]]
        hf_config["skipgpt"] = {
            "router_config": config.to_dict(),
            "threshold": config.threshold,
            "source": str(source.resolve()),
            "routers": f"{ROUTERS_SUBDIR}/{ROUTERS_NAME}",
        }
        (stage / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (stage / ROUTERS_SUBDIR).mkdir()
        for name in (CONFIG_NAME, ROUTERS_NAME):
            shutil.copy2(source / name, stage / ROUTERS_SUBDIR / name)
    return out
