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
from .routing import RoutingPolicy

__all__ = ["calibrate_threshold", "weighted_quantile"]


class _ThresholdProbe(RoutingPolicy):
    """Routes at a fixed θ and keeps every p(execute) it saw, with its budget weight."""

    def __init__(self, theta: float, weights: dict[tuple[int, str], float]):
        self.theta, self.weights = theta, weights
        self.probs: list[torch.Tensor] = []
        self.probe_weights: list[torch.Tensor] = []

    def decide(self, layer, module: str, hidden: torch.Tensor) -> torch.Tensor:
        p = layer.execute_probability(module, hidden)
        self.probs.append(p.reshape(-1).float().cpu())
        self.probe_weights.append(torch.full((p.numel(),), self.weights.get((layer.layer_idx, module), 0.0)))
        return p >= self.theta


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
    tolerance: float = 0.003,
    bisect_steps: int = 24,
) -> float:
    """θ such that deterministic routing skips ``target`` of the decisions on ``blocks`` (N, T).

    ``budget``: 'modules' (each decision counts 1) or 'params' (weighted by module size);
    defaults to the model's config. The quantile fixed point is checked by one more pass; if the
    sparsity it realises misses the target by more than ``tolerance`` (routers whose scores sit
    on a cliff, where skipping in one layer moves every later one), θ is bisected on the
    realised sparsity instead and the closest θ kept. Sets the model's θ
    (``SkipGPTModel.set_threshold``: used from now on and saved) and returns it.
    """
    budget = budget or model.skipgpt_config.budget
    weights = model.budget_weights(budget)
    was_training = model.training
    model.eval()
    # modules removed for good (``removed``) skip every token whatever θ: their weight counts as
    # skipped in the sparsity, and the routed decisions make up the rest of the target
    removed = blocks.numel() * sum(weights.get(k, 0.0) for k in model.routing_settings.removed)

    def route_at(theta: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Run ``blocks`` with routing at ``theta``: every p(execute), its weight, the sparsity."""
        probe = _ThresholdProbe(theta, weights)
        with model.routing(policy=probe, execution="masked"):
            for s in range(0, blocks.shape[0], batch_size):
                model(
                    input_ids=blocks[s : s + batch_size].to(next(model.parameters()).device), use_cache=False
                )
        p, w = torch.cat(probe.probs), torch.cat(probe.probe_weights).to(torch.float64)
        return p, w, float(((w * (p < theta)).sum() + removed) / (w.sum() + removed))

    theta = model.routing_settings.threshold
    for _ in range(iters):
        probs, ws, _ = route_at(theta)
        total = float(ws.sum())
        routed_target = min(max((target * (total + removed) - removed) / total, 0.0), 1.0)
        theta = min(max(weighted_quantile(probs, ws, routed_target), 0.0), 1.0)
    miss = abs(route_at(theta)[2] - target)
    if miss > tolerance:
        best, lo, hi = (miss, theta), 0.0, 1.0
        for _ in range(bisect_steps):
            mid = (lo + hi) / 2
            realised = route_at(mid)[2]
            best = min(best, (abs(realised - target), mid))
            lo, hi = (mid, hi) if realised < target else (lo, mid)
        theta = best[1]
    model.set_threshold(theta)  # used from now on, and saved with the routers
    model.train(was_training)
    return theta
