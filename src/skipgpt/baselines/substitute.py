"""The static substitute baseline: chosen MLPs replaced by their closed-form substitutes.

No routers are trained. The MLPs are scored as LLM-Drop scores them (``1 - E_t[cos(branch
input, branch output)]`` on calibration text, ``llm_drop.module_importance``) and the lowest
ones are replaced, for every token, by a rank-r linear map fitted by reduced-rank least squares
on the same text (``substitutes.fit_substitutes``), until the parameters they save (an MLP's
less its substitute's) are nearest the target share of the attention+MLP parameters.

Measured on SmolLM2-135M (issue 18, PTB test): replacing the MLPs of layers 12-17 by rank-36
fits gives PPL 104.9 where removing them gives 248.1 (dense 48.74): a strong static point that
the dynamic method must beat.

Representation: a routed skipgpt folder (kind ``routed``, ``metadata.baseline =
"static-substitute"``) over the unchanged base model: only MLPs are routed, every router is
constant (linear, zero weight, a ±30 bias: replaced MLPs always skip, the others always
execute), and every MLP has a substitute (zero for the kept ones), saved with the routers. It
loads, evaluates, benchmarks and exports like any routed folder; the skipping path runs the
replaced MLPs' substitutes and nothing else of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SkipGPTConfig
from ..model import SkipGPTModel, get_skipgpt_model
from ..substitutes import fit_substitutes
from .llm_drop import module_importance, set_static_routers
from .scores import baseline_output, branch_param_counts, select_by_budget

__all__ = [
    "BASELINE",
    "substitute_config",
    "build_static_substitute",
    "substitute_params",
    "select_replaced_mlps",
    "static_substitute_prune",
    "save_static_substitute",
]

BASELINE = "static-substitute"


def substitute_config(rank: int | None, target: float = 0.25) -> SkipGPTConfig:
    """The router config of the baseline: MLPs routed by constant linear routers, each with a
    closed-form substitute of ``rank`` (None: hidden // 16)."""
    return SkipGPTConfig(
        target_sparsity=target,
        router_hidden=0,
        budget="params",
        sparsity_weight=0.0,
        modules=("mlp",),
        mlp_skip_to="adapter",
        substitute_rank=rank,
        substitute_init="closed-form",
    )


def build_static_substitute(
    base: nn.Module,
    replaced: Iterable[int],
    blocks: torch.Tensor,
    *,
    rank: int | None = None,
    base_spec: str | None = None,
    target: float = 0.25,
    max_tokens: int = 8192,
    batch_size: int = 4,
) -> tuple[SkipGPTModel, dict]:
    """Wrap ``base`` (in place) with the MLPs of layers ``replaced`` replaced by their
    substitutes, fitted on at most ``max_tokens`` tokens of ``blocks`` (N, T). Returns the model
    and the fit report (``fit_substitutes``)."""
    replaced = sorted({int(i) for i in replaced})
    model = get_skipgpt_model(base, substitute_config(rank, target), base_spec=base_spec)
    fit = fit_substitutes(model, blocks, max_tokens, batch_size, pairs=[(i, "mlp") for i in replaced])
    set_static_routers(model, [(i, "mlp") for i in replaced])
    return model.eval(), fit


def substitute_params(hidden: int, rank: int) -> int:
    """Parameters of one linear substitute of rank ``rank`` (down, up, bias)."""
    return 2 * hidden * rank + hidden


def select_replaced_mlps(
    params: dict[tuple[int, str], int],
    scores: dict[tuple[int, str], float] | None,
    sparsity: float,
    sub_params: int,
    rounding: str = "nearest",
) -> tuple[list[tuple[int, str]], float]:
    """The MLPs to replace, lowest ``scores`` first, until the parameters they save (each MLP's
    less ``sub_params``) are nearest ``sparsity`` of the attention+MLP parameters ``params``
    ((layer, module) -> count, ``branch_param_counts``). ``scores`` None only checks the budget.
    Returns (chosen pairs in replacement order, realised net share)."""
    total = sum(params.values())
    net = {k: v - sub_params for k, v in params.items() if k[1] == "mlp"}
    scores = dict.fromkeys(net, 0.0) if scores is None else {k: scores[k] for k in net}
    return select_by_budget(scores, net, sparsity, total, rounding, unit="MLP")


def static_substitute_prune(
    base: nn.Module,
    blocks: torch.Tensor,
    sparsity: float,
    *,
    rank: int | None = None,
    base_spec: str | None = None,
    rounding: str = "nearest",
    batch_size: int = 4,
    max_tokens: int = 8192,
    progress: bool = True,
) -> tuple[SkipGPTModel, dict[str, Any]]:
    """Score the MLPs of ``base`` on ``blocks`` (N, T), replace the lowest by closed-form
    substitutes until the parameters saved are nearest ``sparsity`` of the attention+MLP
    parameters. Returns the wrapped model and the record saved as metadata."""
    params = branch_param_counts(base)
    total = sum(params.values())
    hidden = base.config.get_text_config(decoder=True).hidden_size
    r = substitute_config(rank).rank_for(hidden)
    sub_params = substitute_params(hidden, r)
    select_replaced_mlps(params, None, sparsity, sub_params, rounding)  # the budget, before scoring
    scores = module_importance(base, blocks, batch_size=batch_size, progress=progress)
    chosen, realised = select_replaced_mlps(params, scores, sparsity, sub_params, rounding)
    replaced = [i for i, _ in chosen]
    model, fit = build_static_substitute(
        base,
        replaced,
        blocks,
        rank=r,
        base_spec=base_spec,
        target=sparsity,
        max_tokens=max_tokens,
        batch_size=batch_size,
    )
    n = sum(1 for k in params if k[1] == "mlp")
    record = {
        "baseline": BASELINE,
        "target_sparsity": sparsity,
        "rounding": rounding,
        "rank": r,
        "budget": "params: replaced MLP parameters less their substitutes' / attention+MLP parameters of all layers",
        "replaced_mlps": replaced,  # in replacement order
        "scores": {"mlp": [scores[(i, "mlp")] for i in range(n)]},
        "fit": fit,
        "sparsity": {
            "module": len(replaced) / (2 * n),
            "attn": 0.0,
            "mlp": len(replaced) / n,
            "params": sum(params[(i, "mlp")] for i in replaced) / total,
            "params_net": realised,
        },
        "calibration": {"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])},
    }
    return model, record


def save_static_substitute(
    model: SkipGPTModel, output: str | Path, record: dict[str, Any], overwrite: bool = False
) -> Path:
    """Save as a routed skipgpt folder (config, constant routers, substitutes); the record goes
    into its metadata."""
    with baseline_output(output, overwrite) as stage:
        model.save_pretrained(stage, metadata=record)
    return Path(output)
