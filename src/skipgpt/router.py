"""The per-token router and its decision rules.

A router maps a hidden state to two logits, index 0 = *skip*, index 1 = *execute*.
Training draws hard decisions with straight-through Gumbel-softmax (forward: 0/1, backward:
the soft sample's gradient); inference is deterministic: execute iff p(execute) >= threshold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Router", "FusedRouters", "SKIP", "EXECUTE", "STATIC_LOGIT", "NORM_EPS", "linear_schedule"]

SKIP, EXECUTE = 0, 1
STATIC_LOGIT = 30.0  # |logit(execute) - logit(skip)| of a constant router: p = 1 - 1e-13
NORM_EPS = 1e-6  # of a router's RMS normalisation (``norm="rms"``)


def _normed(hidden: torch.Tensor, norm: str, dtype: torch.dtype) -> torch.Tensor:
    """The router's input: ``hidden`` in ``dtype``, RMS-normalised over its last dim when ``norm`` is "rms"."""
    hidden = hidden.to(dtype)
    return F.rms_norm(hidden, (hidden.shape[-1],), eps=NORM_EPS) if norm == "rms" else hidden


class Router(nn.Module):
    """``Linear(d, h) -> ReLU -> Linear(h, 2)`` (paper code) or ``Linear(d, 2)`` when h = 0.

    ``init="dense"`` zeroes the last layer's weight and sets its bias to
    ``(0, execute_bias)``, so that at step 0 every token executes at inference and the
    routed model equals the base model; ``init="paper"`` keeps PyTorch's default init
    (p(execute) near 0.5, which starts training far from the dense model).

    ``norm="rms"`` divides the hidden state by its root mean square first (no weight). The
    residual stream's scale grows through the depth (SmolLM2-135M: median RMS 0.12 at layer 0,
    32 at layer 29, about 1000 for the first token at layers 12-28), so on the raw state one
    optimiser step moves a deep router's logits a hundred times as far as an early one's.
    """

    def __init__(
        self,
        hidden_size: int,
        router_hidden: int,
        init: str = "dense",
        execute_bias: float = 3.0,
        norm: str = "none",
    ):
        super().__init__()
        self.input_norm = norm
        if router_hidden == 0:
            self.net = nn.Sequential(nn.Linear(hidden_size, 2))
        else:
            self.net = nn.Sequential(
                nn.Linear(hidden_size, router_hidden), nn.ReLU(), nn.Linear(router_hidden, 2)
            )
        if init == "dense":
            last = self.net[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.copy_(torch.tensor([0.0, execute_bias]))

    @classmethod
    def from_config(cls, hidden_size: int, config) -> Router:
        """The router a ``SkipGPTConfig`` describes for a model of width ``hidden_size`` (its
        hidden width: ``router_hidden``, None meaning ``hidden_size // 4``)."""
        width = hidden_size // 4 if config.router_hidden is None else config.router_hidden
        return cls(hidden_size, width, config.router_init, config.execute_bias, config.router_norm)

    def make_constant(self, execute: bool) -> None:
        """Answer ``execute`` for every token (weights zero, logits ``±STATIC_LOGIT``) and stop
        training: a protected module (always executes) or a statically dropped one (never)."""
        last = self.net[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([0.0, STATIC_LOGIT if execute else -STATIC_LOGIT]))
        self.requires_grad_(False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, T, d) in any dtype -> logits (B, T, 2) in the router's dtype."""
        return self.net(_normed(hidden, self.input_norm, self.net[0].weight.dtype))

    def execute_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> p(execute), (B, T)."""
        return self(hidden).softmax(-1)[..., EXECUTE]

    def sample_gate(self, hidden: torch.Tensor, tau: float) -> torch.Tensor:
        """Training: hard straight-through Gumbel-softmax execute gate (B, T), values 0/1."""
        return F.gumbel_softmax(self(hidden), tau=tau, hard=True)[..., EXECUTE]

    def decide(self, hidden: torch.Tensor, threshold: float) -> torch.Tensor:
        """Inference: boolean execute mask (B, T), no noise."""
        return self.execute_probability(hidden) >= threshold


class FusedRouters:
    """Several routers that read the *same* hidden state, evaluated as one router (inference).

    The first layers are stacked into one ``Linear(d, R·h)`` and the last layers into one
    block-diagonal ``Linear(R·h, 2R)``, so R routers cost two GEMM calls instead of 2R (in
    decode, where each call multiplies one row, the call count is the cost). The stacked
    weights are rebuilt whenever a router parameter changes (tracked by the tensors' version
    counters), so they can never serve stale weights. Not a module: no parameters of its own.

    ``execute`` decides without a softmax: ``p(execute) >= θ`` is ``l_execute - l_skip >=
    log(θ / (1 - θ))``, so the last layer is stacked as the *difference* of each router's two
    rows, with the threshold's logit folded into its bias, and the decision is the sign of one
    more GEMM (a linear router: one GEMM and a comparison in all).

    ``frozen=True`` (a server, whose routers never change after loading) skips that check once
    the weights are built: ``refresh()`` after writing new router weights.
    """

    def __init__(self, routers: list[Router], frozen: bool = False):
        self.routers = routers
        self.frozen = frozen
        self.input_norm = routers[0].input_norm
        if any(r.input_norm != self.input_norm for r in routers):
            raise ValueError("fused routers must normalise their input alike")
        # where each parameter lives, read afresh on every call (a replaced Parameter is seen);
        # cheaper than walking the modules with .parameters(), which decode pays once per layer
        self._slots = [(m, name) for r in routers for m in r.modules() for name in m._parameters]
        self._key: tuple | None = None
        self._weights: tuple[torch.Tensor, ...] = ()
        self._margin_key: tuple | None = None
        self._margin: tuple[torch.Tensor, ...] = ()

    def refresh(self) -> None:
        """Rebuild the stacked weights on the next call (after the routers' weights changed)."""
        self._key = self._margin_key = None

    def _stacked(self) -> tuple[torch.Tensor, ...]:
        if self.frozen and self._key is not None:
            return self._weights
        params = [m._parameters[name] for m, name in self._slots]
        # inference tensors (routers built under torch.inference_mode) have no version counter;
        # they cannot be trained, so their storage identifies them
        key = tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.device, p.dtype) for p in params)
        if key != self._key:
            with torch.no_grad():
                first = [r.net[0] for r in self.routers]
                w1 = torch.cat([f.weight for f in first])
                b1 = torch.cat([f.bias for f in first])
                if len(self.routers[0].net) == 1:  # linear routers: one layer only
                    self._weights = (w1, b1)
                else:
                    last = [r.net[-1] for r in self.routers]
                    w2 = torch.block_diag(*[ll.weight for ll in last])
                    b2 = torch.cat([ll.bias for ll in last])
                    self._weights = (w1, b1, w2, b2)
            self._key = key
        return self._weights

    def _margin_weights(self, threshold: float) -> tuple[torch.Tensor, ...]:
        """The stacked weights with the last layer as ``execute row - skip row`` and
        ``-logit(θ)`` in its bias; rebuilt when the routers or θ change."""
        if self.frozen and self._margin_key is not None and self._margin_key[1] == threshold:
            return self._margin
        w = self._stacked()
        key = (self._key, float(threshold))
        if key != self._margin_key:
            with torch.no_grad():
                last_w, last_b = w[-2:]
                shift = math.log(threshold) - math.log1p(-threshold)
                diff_w = (last_w[EXECUTE::2].double() - last_w[SKIP::2].double()).to(last_w.dtype)
                diff_b = (last_b[EXECUTE::2].double() - last_b[SKIP::2].double() - shift).to(last_b.dtype)
                self._margin = (*w[:-2], diff_w.contiguous(), diff_b.contiguous())
            self._margin_key = key
        return self._margin

    def execute(self, hidden: torch.Tensor, threshold: float) -> torch.Tensor:
        """(B, T, d) -> ``p(execute) >= θ`` of every router, (B, T, R) bool, as a sign test on
        the logit margin (θ of 0 or 1, where the logit is infinite, take the probabilities)."""
        if not 0.0 < threshold < 1.0:
            return self.execute_probability(hidden) >= threshold
        return self.margins(hidden, threshold) >= 0

    def margins(self, hidden: torch.Tensor, threshold: float) -> torch.Tensor:
        """(B, T, d) -> (B, T, R) float32 ``logit p(execute) - logit θ`` of every router: a token
        executes a router's module iff its margin is >= 0. θ strictly between 0 and 1."""
        w = self._margin_weights(threshold)
        h = F.linear(_normed(hidden, self.input_norm, w[0].dtype), w[0], w[1])
        if len(w) == 4:
            h = F.linear(F.relu(h), w[2], w[3])
        return h

    def execute_one(self, hidden: torch.Tensor, threshold: float) -> list[bool]:
        """The decisions of ``execute`` for a single token (hidden of d elements) as Python bools,
        one per router: matrix-vector products and one host read, no bool tensor (batch-1 decode
        on a CPU, where each tensor op costs microseconds of the layer's time)."""
        if not 0.0 < threshold < 1.0:
            return self.execute(hidden, threshold).view(-1).tolist()
        w = self._margin_weights(threshold)
        h = torch.addmv(w[1], w[0], _normed(hidden.reshape(-1), self.input_norm, w[0].dtype))
        if len(w) == 4:
            h = torch.addmv(w[3], w[2], h.relu_())
        return [m >= 0 for m in h.tolist()]

    def execute_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> p(execute) of every router, (B, T, R)."""
        w = self._stacked()
        h = F.linear(_normed(hidden, self.input_norm, w[0].dtype), w[0], w[1])
        if len(w) == 4:
            h = F.linear(F.relu(h), w[2], w[3])
        return h.unflatten(-1, (len(self.routers), 2)).softmax(-1)[..., EXECUTE]


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    """Value at ``step`` of a linear ramp from ``start`` (step 0) to ``end`` (step total-1 and after)."""
    if total <= 1:
        return end
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return start + (end - start) * frac
