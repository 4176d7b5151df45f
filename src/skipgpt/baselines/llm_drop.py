"""LLM-Drop (He et al., 2024, "What Matters in Transformers? Not All Attention is Needed").

Joint layer drop: every attention and every MLP module is scored by how much its residual
branch changes the stream on calibration text, ``1 - E_t[cos(branch input, branch output)]``
(``scores.residual_similarities``), and the lowest-scored modules, attention and MLP alike,
are dropped statically until their parameter share is nearest the target.

Representation (why not a pruned HF folder): Hugging Face configs cannot express "layer 7 has
no attention", so a pruned copy would not load as an ordinary model. The result is instead a
skipgpt folder over the *unchanged* base model whose routing is static:

* ``RoutingState.removed`` holds the dropped (layer, module) pairs; the routed layer does not
  run them at all (a dropped attention computes no query, no K/V and writes nothing to the
  cache), and records them as skipped, so ``sparsity_stats`` measures the budget like any row;
* the remaining attention modules are renumbered to the first KV-cache slots of their type (a
  slot that is never written would otherwise confuse ``get_seq_length``/masks in generation);
* the routers are constant (zero weights, a large bias): every kept module executes, every
  dropped one would be skipped even by code that ignores ``removed``;
* ``skipgpt_config.json`` records ``removed_modules`` (``skipgpt.checkpoint``; the metadata keeps
  them too, in removal order, with the scores); ``SkipGPTModel.from_pretrained`` (hence
  ``load_model``) re-applies the removal on load (``skipgpt.removal.apply_removal``, re-exported here).

The folder holds only a few KB; the kept routers are linear (``d -> 2``), a negligible cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import MODULES, SkipGPTConfig
from ..errors import SkipGPTError
from ..model import SkipGPTModel, get_skipgpt_model
from ..removal import apply_removal, removed_pairs
from ..router import STATIC_LOGIT
from .scores import (
    baseline_output,
    branch_param_counts,
    check_budget,
    residual_similarities,
    select_by_budget,
    unit_params,
)

__all__ = [
    "STATIC_LOGIT",
    "module_importance",
    "apply_removal",
    "set_static_routers",
    "build_llm_drop",
    "llm_drop_prune",
    "save_llm_drop",
]


def module_importance(
    model: nn.Module,
    blocks: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[tuple[int, str], float]:
    """blocks (N, T) -> {(layer, 'attn'|'mlp'): 1 - mean cos(branch input, branch output)}."""
    sims = residual_similarities(model, blocks, attention_mask, batch_size=batch_size, progress=progress)
    return {(i, m): 1.0 - sims[m][i] for m in MODULES for i in range(len(sims[m]))}


def set_static_routers(model: SkipGPTModel, removed: Iterable) -> None:
    """Make every router constant: execute for kept modules, skip for ``removed`` ones."""
    pairs = removed_pairs(removed, len(model.routed_layers))
    for layer in model.routed_layers:
        for m, router in layer.routers.items():
            router.make_constant(execute=(layer.layer_idx, m) not in pairs)


def build_llm_drop(
    base: nn.Module, removed: Iterable, base_spec: str | None = None, target: float = 0.25
) -> SkipGPTModel:
    """Wrap ``base`` (in place) as a statically routed model with ``removed`` (layer, module) dropped."""
    config = SkipGPTConfig(target_sparsity=target, router_hidden=0, budget="params", sparsity_weight=0.0)
    model = get_skipgpt_model(base, config, base_spec=base_spec)
    removed = list(removed)
    set_static_routers(model, removed)
    return apply_removal(model, removed)


def llm_drop_prune(
    base: nn.Module,
    blocks: torch.Tensor,
    sparsity: float,
    *,
    base_spec: str | None = None,
    modules: Iterable[str] = MODULES,
    attention_mask: torch.Tensor | None = None,
    rounding: str = "nearest",
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[SkipGPTModel, dict[str, Any]]:
    """Score the modules of ``base`` on ``blocks`` (N, T), drop the lowest ones to meet ``sparsity``.

    ``modules``: which kinds may be dropped ('attn', 'mlp' = joint drop, the default; 'attn' alone
    is the paper's Attention Drop). Returns the wrapped model and the record saved as metadata.
    """
    modules = tuple(modules)
    if not modules or any(m not in MODULES for m in modules):
        raise SkipGPTError(f"modules must be a non-empty subset of {list(MODULES)}, got {list(modules)}")
    check_budget(base, sparsity, rounding, units=modules)  # before the (slow) scoring
    candidates, total = unit_params(base, modules)
    n = len(branch_param_counts(base)) // len(MODULES)
    scores = module_importance(base, blocks, attention_mask, batch_size=batch_size, progress=progress)
    removed, realised = select_by_budget(
        {k: scores[k] for k in candidates}, candidates, sparsity, total, rounding, unit="module"
    )
    model = build_llm_drop(base, removed, base_spec=base_spec, target=sparsity)
    attn = sum(1 for _, m in removed if m == "attn")
    record = {
        "baseline": "llm-drop",
        "target_sparsity": sparsity,
        "rounding": rounding,
        "droppable": list(modules),
        "budget": "params: removed attention+MLP parameters / those of all decoder layers",
        "removed_modules": [[i, m] for i, m in removed],  # in removal order
        "scores": {m: [scores[(i, m)] for i in range(n)] for m in MODULES},
        "sparsity": {
            "module": len(removed) / (2 * n),
            "attn": attn / n,
            "mlp": (len(removed) - attn) / n,
            "params": realised,
        },
        "calibration": {"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])},
    }
    return model, record


def save_llm_drop(
    model: SkipGPTModel, output: str | Path, record: dict[str, Any], overwrite: bool = False
) -> Path:
    """Save as a skipgpt folder (config + constant routers); the record goes into its metadata."""
    with baseline_output(output, overwrite) as stage:
        model.save_pretrained(stage, metadata=record)
    return Path(output)
