"""How a routed layer runs its two residual branches once the gates are decided.

Two executors, picked once per forward by ``choose_executor``:

* ``ReferenceExecutor`` (training, ``execution="masked"``, dense): every module runs on every
  token and its output is multiplied by the gate, ``x + g * module(x)``; gradients reach the
  router through ``g``.
* ``SkippingExecutor`` (inference, ``execution="fast"``): only the executing tokens run
  (``fast.fast_attn_residual`` / ``fast_mlp_residual``: gather, run, scatter; a skipping token
  still writes its K/V). On a device whose host reads stop its queue it first reads a layer's
  decisions to the host in one copy (``prepare`` -> ``fast.HostPlan``).

A module with a substitute (``layer.substitutes``, ``skip_to="adapter"``) adds it for the
tokens that skip: the reference adds ``(1 - g) * substitute(x)`` for every token (gradients reach
the router and the substitute); the skipping executor runs it on the real skipping tokens only
(``fast.fast_substitute_residual``). A None gate (always executes) or REMOVED runs no substitute.

Both read a gate the same way (``routing.Gate``): None runs the module on every token, REMOVED
runs nothing (not even the K/V projections), a (B, T) gate or a single token's Python bool runs
the module where it is true.
"""

from __future__ import annotations

import torch

from .fast import (
    HostPlan,
    fast_attn_residual,
    fast_mlp_residual,
    fast_substitute_residual,
    plan_decisions,
    reads_are_free,
)
from .routing import REMOVED, Gate

__all__ = ["Executor", "ReferenceExecutor", "SkippingExecutor", "choose_executor", "as_mask"]


def as_mask(gate: torch.Tensor | bool) -> torch.Tensor | bool:
    """(B, T) execute gate -> bool mask (a single token's Python bool stays as it is)."""
    return gate if isinstance(gate, bool) or gate.dtype == torch.bool else gate > 0.5


class Executor:
    """Runs ``x + gate · branch(x)`` for a routed layer's attention and MLP branches."""

    host_bools = False  # takes a single token's decisions as Python bools
    decides_together = False  # wants both decisions before the attention (one host read)

    def prepare(self, layer, gates: dict[str, Gate]) -> dict[str, Gate | HostPlan]:
        """What the branches will be given for ``gates`` (by default the gates themselves)."""
        return gates

    def attn_residual(self, layer, x: torch.Tensor, gate: Gate | HostPlan, **kwargs) -> torch.Tensor:
        """x (B, T, d) -> x + gated attention branch; ``kwargs`` go to the attention module."""
        if gate is REMOVED:
            return x
        if gate is None:
            return x + layer.attn_branch(x, **kwargs)
        out = self._attn(layer, x, gate, **kwargs)
        return self._substitute(layer, "attn", x, gate, out) if "attn" in layer.substitutes else out

    def mlp_residual(self, layer, x: torch.Tensor, gate: Gate | HostPlan) -> torch.Tensor:
        """x (B, T, d) -> x + gated MLP branch."""
        if gate is REMOVED:
            return x
        if gate is None:
            return x + layer.mlp_branch(x)
        out = self._mlp(layer, x, gate)
        return self._substitute(layer, "mlp", x, gate, out) if "mlp" in layer.substitutes else out

    def _attn(self, layer, x, gate, **kwargs):
        raise NotImplementedError

    def _mlp(self, layer, x, gate):
        raise NotImplementedError

    def _substitute(self, layer, module, x, gate, out):
        """out + ``module``'s substitute on the skipping tokens of x (B, T, d)."""
        raise NotImplementedError


class ReferenceExecutor(Executor):
    """Every module on every token, output times the gate (the masked, differentiable path).

    ``host_bools`` (inference, where reading a decision costs nothing: the CPU): a single
    token's decisions come as Python bools; it still runs every module, and its output is added
    or not, which equals multiplying it by 1 or 0."""

    def __init__(self, host_bools: bool = False):
        self.host_bools = host_bools

    def _attn(self, layer, x, gate, **kwargs):
        return _gated_add(x, gate, layer.attn_branch(x, **kwargs))

    def _mlp(self, layer, x, gate):
        return _gated_add(x, gate, layer.mlp_branch(x))

    def _substitute(self, layer, module, x, gate, out):
        sub = layer.substitute_branch(module, x)
        if isinstance(gate, bool):
            return out if gate else out + sub
        skip = ~gate if gate.dtype == torch.bool else 1 - gate
        return out + _times(skip, sub)


class SkippingExecutor(Executor):
    """Only the executing tokens run (``fast.py``). ``on_device``: decisions are read to the
    host once per layer (``fast.plan_decisions``) instead of where each kernel needs them."""

    host_bools = True

    def __init__(self, on_device: bool):
        self.on_device = self.decides_together = on_device

    def prepare(self, layer, gates):
        if not self.on_device:
            return gates
        masks = {m: as_mask(g) for m, g in gates.items() if isinstance(g, torch.Tensor)}
        return {**gates, **plan_decisions(layer, masks)} if masks else gates

    def _attn(self, layer, x, gate, **kwargs):
        return fast_attn_residual(layer, x, gate if isinstance(gate, HostPlan) else as_mask(gate), **kwargs)

    def _mlp(self, layer, x, gate):
        return fast_mlp_residual(layer, x, gate if isinstance(gate, HostPlan) else as_mask(gate))

    def _substitute(self, layer, module, x, gate, out):
        gate = gate if isinstance(gate, HostPlan) else as_mask(gate)
        return fast_substitute_residual(layer, module, x, gate, out)


REFERENCE = ReferenceExecutor()
_REFERENCE_HOST = ReferenceExecutor(host_bools=True)
_SKIPPING = {False: SkippingExecutor(on_device=False), True: SkippingExecutor(on_device=True)}


def choose_executor(layer, hidden: torch.Tensor) -> Executor:
    """The executor of one forward of ``layer``: the skipping one at inference with routing on
    and ``execution="fast"``, else the reference."""
    settings = layer.settings
    if layer.training or not settings.enabled:
        return REFERENCE
    free = reads_are_free(hidden)
    if settings.execution != "fast":
        return _REFERENCE_HOST if free else REFERENCE
    return _SKIPPING[not free]


def _gated_add(x: torch.Tensor, gate: torch.Tensor | bool, out: torch.Tensor) -> torch.Tensor:
    """``x + gate · out``; a Python bool gate adds ``out`` or not."""
    if isinstance(gate, bool):
        return x + out if gate else x
    return x + _times(gate, out)


def _times(gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``gate * out`` for a (B, T) gate and a (B, T, d) module output."""
    return gate.unsqueeze(-1).to(out.dtype) * out
