"""One entry point for every model spec, including skipgpt output folders."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import CONFIG_NAME, SkipGPTConfig
from .model import SkipGPTModel, resolve_base_spec

__all__ = ["load_model", "is_skipgpt_dir"]


def is_skipgpt_dir(spec: str | Path) -> bool:
    return Path(spec).is_dir() and (Path(spec) / CONFIG_NAME).exists()


def load_model(spec: str, dtype: torch.dtype | None = None, threshold: float | None = None):
    """spec -> (model, tokenizer). A skipgpt folder gives a ``SkipGPTModel`` (routers loaded, and
    its LoRA adapter if it has one); any other spec gives the plain HF model. Both in eval mode."""
    from .specs import load_base_model

    dtype = dtype or torch.float32
    if is_skipgpt_dir(spec):
        record = SkipGPTConfig.read_json(Path(spec) / CONFIG_NAME)
        base, tokenizer = load_base_model(resolve_base_spec(record, spec), dtype=dtype)
        if record.get("router_config") is None:  # dense + LoRA (finetune-lora --dense): no routers
            from .train.lora import ADAPTER_DIR, load_adapter

            load_adapter(base, Path(spec) / ADAPTER_DIR)
            return base.eval(), tokenizer
        model = SkipGPTModel.from_pretrained(spec, base_model=base)
        if threshold is not None:
            model.set_threshold(threshold)
    else:
        model, tokenizer = load_base_model(spec, dtype=dtype)
    return model.eval(), tokenizer
