"""MoD-D: Mixture-of-Depths capacity routing, decoupled for attention and MLP, router-tuned.

Each (layer, module) has its own router (the same ``Router`` as SkipGPT). Instead of deciding
per token with a threshold, a module processes exactly the top ``T - round(s·T)`` real tokens of
each sequence by router score, ``s`` the skip rate (capacity ``1 - s``); padding is never
selected. With the same rate for every module, the parameter sparsity is ``s`` exactly (up to
the per-sequence rounding), so MoD-D meets a parameter budget by construction.

Implementation: a routing policy (``routing.TopKPolicy``), so ``layer.py`` is untouched.
In training the gate is the hard top-k mask with a straight-through gradient,
``hard + p - p.detach()`` (p = the router's p(execute)): the forward computes the top-k
output, the router learns which tokens profit most from the module. The routers are tuned
with ``train_routers`` (same loop, data and steps as SkipGPT; ``sparsity_weight = 0`` since the budget
is fixed by the top-k).

Caveat (as in the Mixture-of-Depths paper): top-k over a sequence is not causal (a token's
selection depends on later tokens' scores), and one decoded token is always selected. The saved
folder therefore also carries a threshold θ calibrated to the same budget on the training
text, so ``load_model`` gives a causal, threshold-routed MoD-D; ``topk_routing`` re-applies the
top-k rule used in training (what ``compare`` reports as "MoD-D (top-k)").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from ..config import SkipGPTConfig
from ..errors import SkipGPTError
from ..model import SkipGPTModel, get_skipgpt_model
from ..routing import TopKPolicy
from ..train.loop import LoopArgs
from ..train.router_tuning import RouterTuningArgs, train_routers

__all__ = ["TopKPolicy", "topk_override", "topk_routing", "train_mod"]


def topk_override(model: SkipGPTModel, skip_rate: float, straight_through: bool = True):
    """``TopKPolicy`` as a plain ``(layer_idx, module, hidden) -> (B, T) gate`` callable of
    ``model`` (for callers that call the rule directly; ``routing(override=...)`` takes it).

    The gate is bool at inference, ``hard + p - p.detach()`` (float, 0/1 values) when gradients
    are enabled and ``straight_through``.
    """
    policy = TopKPolicy(skip_rate, straight_through)
    layers = model.routed_layers

    def override(layer_idx: int, module: str, hidden: torch.Tensor) -> torch.Tensor:
        return policy.decide(layers[layer_idx], module, hidden)

    return override


def topk_routing(model: SkipGPTModel, skip_rate: float | None = None):
    """Context manager: route ``model`` by top-k capacity (default: the rate it was trained with)."""
    if skip_rate is None:
        meta = getattr(model, "metadata", {}) or {}
        if meta.get("baseline") != "mod-d":
            raise SkipGPTError("this model was not trained as MoD-D; give skip_rate explicitly")
        skip_rate = meta["skip_rate"]
    return model.routing(policy=TopKPolicy(skip_rate, straight_through=False))


def train_mod(
    base: nn.Module,
    blocks: torch.Tensor,
    sparsity: float,
    output: str | Path,
    loop: LoopArgs,
    tuning: RouterTuningArgs | None = None,
    *,
    base_spec: str | None = None,
    router_config: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    metadata: dict | None = None,
    progress: bool = True,
) -> tuple[SkipGPTModel, dict]:
    """Wrap ``base`` (in place) with routers, tune them under top-k routing, save to ``output``.

    ``router_config``: extra ``SkipGPTConfig`` fields (router_hidden, router_init, ...).
    After training, θ is calibrated on ``tuning.calibrate_blocks`` blocks so that threshold
    routing meets the same parameter budget (the causal variant ``load_model`` gives).
    """
    from ..train.router_tuning import calibrate_and_measure

    tuning = tuning or RouterTuningArgs()
    fields = dict(router_config or {})
    fields.update(target_sparsity=sparsity, budget="params", sparsity_weight=0.0)
    model = get_skipgpt_model(base, SkipGPTConfig(**fields), base_spec=base_spec)
    meta = {
        "baseline": "mod-d",
        "routing": "top-k per sequence and module (decoupled attention/MLP)",
        "skip_rate": sparsity,
        "capacity": 1.0 - sparsity,
        "budget": "params (uniform skip rate per module = parameter sparsity)",
        **(metadata or {}),
    }
    with model.routing(policy=TopKPolicy(sparsity)):
        result = train_routers(
            model,
            blocks,
            output,
            loop,
            dataclasses.replace(tuning, calibrate_blocks=0),
            resume=resume,
            overwrite=overwrite,
            metadata=meta,
            progress=progress,
        )
    if tuning.calibrate_blocks > 0:  # θ for the causal variant, on the model's params budget
        saved = dict(checkpoint.read(output).metadata)
        saved["threshold_calibration"] = calibrate_and_measure(model, blocks[: tuning.calibrate_blocks])
        model.save_pretrained(output, metadata=saved)
    model.metadata = meta
    return model, result
