"""Pick the inference threshold θ that realises a target sparsity on calibration text.

Training samples decisions (skip with probability p_skip), so the *expected* training skip rate
can match the target while deterministic inference (skip iff p(execute) < θ) does not: a
router that says p_skip = 0.3 for every token skips 30% in training and 0% at θ = 0.5.
Calibration closes that gap without retraining: θ is set to the (parameter-weighted) quantile of
p(execute) over the calibration tokens. Decisions at one layer change the inputs of the next,
so the quantile is recomputed a few times (a fixed-point iteration).
"""

from __future__ import annotations

import torch

from .model import SkipGPTModel

__all__ = ["calibrate_threshold", "weighted_quantile"]


def weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> float:
    """Smallest v such that the weight of values < v is at least ``q`` of the total (values 1-D)."""
    order = values.argsort()
    v, w = values[order], weights[order].to(torch.float64)
    cum = w.cumsum(0) / w.sum()
    i = int(torch.searchsorted(cum, torch.tensor(q, dtype=torch.float64)).clamp(max=len(v) - 1))
    # θ just above v[i]: the values up to v[i] (weight >= q) are skipped
    return float(torch.nextafter(v[i], torch.tensor(float("inf"), dtype=v.dtype)))


@torch.no_grad()
def calibrate_threshold(
    model: SkipGPTModel,
    blocks: torch.Tensor,
    target: float,
    budget: str | None = None,
    iters: int = 3,
    batch_size: int = 4,
) -> float:
    """θ such that deterministic routing skips ``target`` of the decisions on ``blocks`` (N, T).

    ``budget``: 'modules' (each decision counts 1) or 'params' (weighted by module size);
    defaults to the model's config. Sets the model's threshold (state and config) and returns θ.
    """
    budget = budget or model.skipgpt_config.budget
    weights = model._weights(budget)
    layers = model.routed_layers
    was_training = model.training
    model.eval()
    theta = model.state.threshold
    for _ in range(iters):
        probs, ws = [], []

        def override(i, m, h, theta=theta, probs=probs, ws=ws):
            p = layers[i].execute_probability(m, h)
            probs.append(p.reshape(-1).float().cpu())
            ws.append(torch.full((p.numel(),), weights.get((i, m), 0.0)))
            return p >= theta

        with model.routing(override=override, execution="masked"):
            for s in range(0, blocks.shape[0], batch_size):
                model(
                    input_ids=blocks[s : s + batch_size].to(next(model.parameters()).device), use_cache=False
                )
        theta = weighted_quantile(torch.cat(probs), torch.cat(ws), target)
    theta = min(max(theta, 0.0), 1.0)
    model.state.threshold = model.skipgpt_config.threshold = theta  # saved with the routers
    model.train(was_training)
    return theta
