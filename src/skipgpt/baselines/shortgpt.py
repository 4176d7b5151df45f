"""ShortGPT (Men et al., 2024): delete the decoder layers with the lowest Block Influence.

Block Influence of layer l on calibration text: ``BI_l = 1 - E_t[cos(x_l, x_{l+1})]`` over real
tokens t, x_l the layer's input and x_{l+1} its output (a layer that leaves the residual stream
unchanged has BI = 0 and goes first). The lowest-BI layers are removed until their share of
the attention+MLP parameters is nearest the target (``scores.select_by_budget``).

Removal is real: the layers leave the ``ModuleList``, the remaining attention modules are
renumbered (``layer_idx`` indexes the KV cache), and ``config.num_hidden_layers`` /
``config.layer_types`` follow, so the result is an ordinary, smaller HF model that saves as a
safetensors folder and loads with ``load_model`` like any other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..checkpoint import SHORTGPT_RECORD_NAME
from ..errors import SkipGPTError
from .scores import baseline_output, check_budget, residual_similarities, select_by_budget, unit_params

__all__ = [
    "RECORD_NAME",
    "block_influence",
    "lowest_influence_layers",
    "remove_layers",
    "shortgpt_prune",
    "save_pruned",
]

RECORD_NAME = SHORTGPT_RECORD_NAME  # beside the HF files; skipgpt.checkpoint reads it (kind shortgpt)


def block_influence(
    model: nn.Module,
    blocks: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> list[float]:
    """blocks (N, T) -> Block Influence per decoder layer, ``1 - mean cos(input, output)``."""
    sims = residual_similarities(model, blocks, attention_mask, batch_size=batch_size, progress=progress)
    return [1.0 - c for c in sims["block"]]


def lowest_influence_layers(
    model: nn.Module, blocks: torch.Tensor, k: int, batch_size: int = 4, progress: bool = True
) -> tuple[list[int], list[float]]:
    """The ``k`` layers ShortGPT deletes first from ``model`` (a plain HF model), scored on ``blocks``
    (N, T): ``(layers in removal order, every layer's Block Influence)``. The same choice as
    ``skipgpt frontier``'s ShortGPT line with ``k`` layers removed, given the same blocks."""
    per_layer, total = unit_params(model, "layers")
    n = len(per_layer)
    if not 0 < k < n:
        raise SkipGPTError(f"layers to remove must be in 1..{n - 1} (the model has {n} layers), got {k}")
    bi = block_influence(model, blocks, batch_size=batch_size, progress=progress)
    removed, _ = select_by_budget(dict(enumerate(bi)), per_layer, k / n, total, unit="layer")
    return [int(i) for i in removed], bi


def remove_layers(model: nn.Module, indices) -> nn.Module:
    """Delete the decoder layers ``indices`` of ``model`` in place and return it.

    Every submodule with an integer ``layer_idx`` (the attention's KV-cache slot) is renumbered
    to its new position; ``num_hidden_layers`` and ``layer_types`` (when present) follow.
    """
    adapter = get_adapter(model.config.model_type)
    layers = adapter.layers(model)
    n = len(layers)
    drop = {int(i) for i in indices}
    bad = sorted(i for i in drop if not 0 <= i < n)
    if bad:
        raise SkipGPTError(f"layer indices {bad} out of range; the model has layers 0..{n - 1}")
    kept = [i for i in range(n) if i not in drop]
    if not kept:
        raise SkipGPTError(f"removing all {n} layers leaves nothing to run; keep at least one")
    new = nn.ModuleList(layers[i] for i in kept)
    for j, layer in enumerate(new):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j
    parent_path, _, name = adapter.layers_path.rpartition(".")
    parent = model
    for attr in filter(None, parent_path.split(".")):
        parent = getattr(parent, attr)
    setattr(parent, name, new)
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(kept)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept]
    return model


def shortgpt_prune(
    model: nn.Module,
    blocks: torch.Tensor,
    sparsity: float,
    *,
    attention_mask: torch.Tensor | None = None,
    rounding: str = "nearest",
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the layers of ``model`` on ``blocks`` (N, T), remove the lowest-BI ones in place.

    Returns the record saved beside the model: removed layers (and in which order), every
    layer's Block Influence, the realised sparsity (parameter, module, attn, mlp).
    """
    check_budget(model, sparsity, rounding, units="layers")  # before the (slow) scoring
    per_layer, total = unit_params(model, "layers")
    n = len(per_layer)
    bi = block_influence(model, blocks, attention_mask, batch_size=batch_size, progress=progress)
    removed, realised = select_by_budget(
        dict(enumerate(bi)), per_layer, sparsity, total, rounding, unit="layer"
    )
    remove_layers(model, removed)
    share = len(removed) / n
    return {
        "method": "shortgpt",
        "target_sparsity": sparsity,
        "rounding": rounding,
        "budget": "params: removed attention+MLP parameters / those of all decoder layers",
        "removed_layers": sorted(removed),
        "removal_order": list(removed),
        "block_influence": bi,
        "num_layers_before": n,
        "num_layers_after": n - len(removed),
        "sparsity": {"module": share, "attn": share, "mlp": share, "params": realised},
        "calibration": {"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])},
    }


def save_pruned(
    model: nn.Module, tokenizer, output: str | Path, record: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write a normal HF folder (safetensors, config, tokenizer) plus ``shortgpt.json``, atomically."""
    _drop_dequantized_flag(model)
    with baseline_output(output, overwrite) as stage:
        model.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        (stage / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return Path(output)


def _drop_dequantized_flag(model: nn.Module) -> None:
    """A GGUF checkpoint loads *dequantized* (plain float layers) yet stays flagged as quantized,
    which ``save_pretrained`` refuses; drop the flag when every weight really is a float tensor."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quantizer.is_serializable():
        return
    packed = [
        type(m).__name__
        for m in model.modules()
        if "quant" in type(m).__module__ or "gguf" in type(m).__module__
    ]
    if packed or not all(p.is_floating_point() for p in model.parameters()):
        raise SkipGPTError(
            f"the model's weights are quantized ({packed[0] if packed else 'integer tensors'}) and cannot be "
            "saved as a plain HF folder; load it dequantized (float) to prune it"
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
