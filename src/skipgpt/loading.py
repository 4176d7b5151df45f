"""One entry point for every model spec, including skipgpt output folders."""

from __future__ import annotations

import torch

from . import checkpoint
from .checkpoint import is_skipgpt_dir
from .lora_adapter import attach_adapter
from .model import SkipGPTModel

__all__ = ["load_model", "is_skipgpt_dir"]


def load_model(
    spec: str,
    dtype: torch.dtype | None = None,
    threshold: float | None = None,
    device_map: str | dict | None = None,
):
    """spec -> (model, tokenizer). A skipgpt folder, or a skipgpt repo on the Hub (a repo with
    ``skipgpt_config.json``, downloaded), gives a ``SkipGPTModel`` (routers loaded, and its LoRA
    adapter if it has one), a dense + LoRA folder the HF model with its adapter; any other spec
    (a Hub id of a plain model included) gives the plain HF model. All in eval mode. ``dtype`` is
    the base model's (routers stay float32); ``device_map`` as ``load_base_model`` takes it (each
    router sits with its layer)."""
    from . import hub
    from .specs import load_base_model

    dtype = dtype or torch.float32
    if not is_skipgpt_dir(spec) and hub.is_skipgpt_repo(str(spec)):
        spec = str(hub.download(str(spec)))
    if not is_skipgpt_dir(spec):
        model, tokenizer = load_base_model(spec, dtype=dtype, device_map=device_map)
        return model.eval(), tokenizer
    record = checkpoint.read(spec)
    base, tokenizer = load_base_model(record.base_spec, dtype=dtype, device_map=device_map)
    if not record.routed:  # dense + LoRA (finetune-lora --dense): no routers
        attach_adapter(base, record.folder / checkpoint.ADAPTER_DIR)
        return base.eval(), tokenizer
    model = SkipGPTModel.from_pretrained(spec, base_model=base)
    if threshold is not None:
        model.set_threshold(threshold)
    return model.eval(), tokenizer
