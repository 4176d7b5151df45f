"""A decoder layer with a router before its attention and before its MLP.

One ``RoutedDecoderLayer`` wraps the model's own layer (``base_layer``) and reads its parts
through a ``LayerAdapter``; the parts are called exactly as the original layer calls them.
This file holds the *reference* (masked) execution: every module runs on every token and
its output is multiplied by the per-token execute gate, ``x + g * module(x)``, which is what
training needs (gradients reach the router through g). ``fast.py`` holds the execution that
really skips work; it is used at inference and tested against this one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .adapters import LayerAdapter, cache_argument, is_cache, missing_cache_error
from .config import SkipGPTConfig
from .fast import HostPlan, plan_decisions, reads_are_free
from .router import FusedRouters, Router

__all__ = ["RoutedDecoderLayer", "RoutingState"]

# override(layer_idx, module, hidden (B, T, d)) -> execute mask (B, T) bool
RoutingOverride = Callable[[int, str, torch.Tensor], torch.Tensor]


@dataclass
class RoutingState:
    """What all routed layers of one model share during a forward.

    ``token_mask`` (B, T) marks the real (non-padding) tokens of the current forward; it is
    set by a pre-hook on the model. ``skip_rates`` holds the skip rate of each (layer, module)
    of the current forward (training: differentiable, for the loss). ``skipped``/``counted`` add
    up decisions over many forwards for statistics (padding excluded). Decisions on a device
    whose reads stop a queue (``fast.reads_are_free`` is False: a GPU) are counted on the
    device and read to the host only when ``skipped``/``counted`` are asked for; their
    ``skip_rates`` are then 0-dim tensors.
    """

    num_layers: int
    tau: float = 1.0
    threshold: float = 0.5
    enabled: bool = True
    execution: str = "fast"  # "fast" or "masked" at inference; training is always masked
    override: RoutingOverride | None = None
    token_mask: torch.Tensor | None = None
    keep_decisions: bool = False
    # (layer, module) pairs statically removed (LLM-Drop): never run, an attention writes no K/V
    removed: frozenset[tuple[int, str]] = frozenset()
    # training: differentiable tensors; inference: plain floats
    skip_rates: dict[tuple[int, str], torch.Tensor | float] = field(default_factory=dict)
    decisions: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    _skipped: dict[tuple[int, str], float] = field(default_factory=dict, repr=False)
    _counted: dict[tuple[int, str], float] = field(default_factory=dict, repr=False)
    # counts not yet read from the device: key -> (skipped, counted) 0-dim tensors (or a float count)
    _on_device: dict[tuple[int, str], list] = field(default_factory=dict, repr=False)
    # single_token_is_real's cache: the mask it last read, and what it found
    _real_mask: torch.Tensor | None = field(default=None, repr=False)
    _real: bool = field(default=True, repr=False)

    def reset_stats(self) -> None:
        self._skipped.clear()
        self._counted.clear()
        self._on_device.clear()
        self.decisions.clear()

    @property
    def skipped(self) -> dict[tuple[int, str], float]:
        """(layer, module) -> skipped real tokens since ``reset_stats``."""
        self._read_device_counts()
        return self._skipped

    @property
    def counted(self) -> dict[tuple[int, str], float]:
        """(layer, module) -> real tokens decided since ``reset_stats``."""
        self._read_device_counts()
        return self._counted

    def _read_device_counts(self) -> None:
        """Fold the counts kept on the device into the host totals: one read for all of them."""
        if not self._on_device:
            return
        keys = list(self._on_device)
        pairs = [self._on_device[k] for k in keys]
        tensors = [x for pair in pairs for x in pair if isinstance(x, torch.Tensor)]
        values = iter(torch.stack([t.to(torch.float64) for t in tensors]).tolist()) if tensors else iter(())
        for k, pair in zip(keys, pairs, strict=True):
            s, c = (float(next(values)) if isinstance(x, torch.Tensor) else float(x) for x in pair)
            self._skipped[k] = self._skipped.get(k, 0.0) + s
            self._counted[k] = self._counted.get(k, 0.0) + c
        self._on_device.clear()

    def single_token_is_real(self) -> bool:
        """For a one-token forward (batch-1 decode): whether that token is real, not padding.

        Read from ``token_mask`` once per forward (cached on the mask object), not per decision.
        """
        mask = self.token_mask
        if mask is None:
            return True
        if self._real_mask is not mask:
            self._real_mask, self._real = mask, bool(mask.reshape(-1)[0])
        return self._real

    def record(self, layer_idx: int, module: str, gate: torch.Tensor | bool) -> None:
        """gate: (B, T) execute gate, bool or 0/1 values (differentiable in training), or a
        Python bool for a one-token forward decided on the host (batch-1 decode)."""
        key = (layer_idx, module)
        if isinstance(gate, bool):
            n = 1.0 if self.single_token_is_real() else 0.0
            skips = 0.0 if gate else n
            self.skip_rates[key] = skips
        elif not gate.requires_grad and not reads_are_free(gate):
            self._count_on_device(key, gate)
            skips = n = None
        else:
            skips, n = self._count(key, gate)
        if skips is not None:
            self._skipped[key] = self._skipped.get(key, 0.0) + skips
            self._counted[key] = self._counted.get(key, 0.0) + n
        if self.keep_decisions:
            kept = torch.tensor([[gate]]) if isinstance(gate, bool) else (gate.detach() > 0.5).cpu()
            self.decisions.setdefault(key, []).append(kept)

    def _count_on_device(self, key: tuple[int, str], gate: torch.Tensor) -> None:
        """Inference on a GPU: add a (B, T) gate's skipped and real tokens to running totals on
        the device (no host read); ``skip_rates[key]`` becomes a 0-dim tensor."""
        mask = self.token_mask
        if mask is not None and mask.shape != gate.shape:
            mask = None
        executed = gate if gate.dtype == torch.bool else gate > 0.5
        if mask is None:
            n = gate.numel()
            skips = n - executed.count_nonzero()
            self.skip_rates[key] = skips / max(n, 1)
        else:
            real = mask.to(device=gate.device, dtype=torch.bool)
            n = real.count_nonzero()
            skips = (~executed & real).count_nonzero()
            self.skip_rates[key] = skips / n.clamp_min(1)
        acc = self._on_device.get(key)
        if acc is None:
            self._on_device[key] = [skips, n]
        else:
            acc[0], acc[1] = acc[0] + skips, acc[1] + n

    def _count(self, key: tuple[int, str], gate: torch.Tensor) -> tuple[float, float]:
        """(skipped, real) tokens of a (B, T) gate, padding excluded; sets ``skip_rates[key]``."""
        mask = self.token_mask
        if mask is not None and mask.shape != gate.shape:
            mask = None
        if gate.requires_grad:  # training: the loss needs the differentiable rate
            valid = torch.ones_like(gate) if mask is None else mask.to(gate.dtype)
            n_t = valid.sum()
            skips_t = ((1.0 - gate) * valid).sum()
            self.skip_rates[key] = skips_t / n_t.clamp_min(1.0)
            return float(skips_t.detach()), float(n_t)
        # inference: plain counts, one host sync
        executed = gate if gate.dtype == torch.bool else gate > 0.5
        if mask is None:
            n = float(gate.numel())
            skips = n - float(executed.count_nonzero())
        else:
            n = float(mask.count_nonzero())
            skips = float((~executed & mask.to(torch.bool)).count_nonzero())
        self.skip_rates[key] = skips / max(n, 1.0)
        return skips, n


class RoutedDecoderLayer(GradientCheckpointingLayer):
    """``base_layer`` with an attention router and an MLP router.

    Unknown attributes (e.g. ``attention_type``) are read from ``base_layer`` so the model's
    own forward keeps working.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layer_idx: int,
        adapter: LayerAdapter,
        config: SkipGPTConfig,
        hidden_size: int,
        state: RoutingState,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        self.adapter = adapter
        self.skipgpt_config = config
        self.state = state
        self.cache_arg = cache_argument(base_layer)  # "cache" (transformers >= 5.24) or "past_key_values"
        width = hidden_size // 4 if config.router_hidden is None else config.router_hidden
        self.routers = nn.ModuleDict(
            {m: Router(hidden_size, width, config.router_init, config.execute_bias) for m in config.modules}
        )
        # the attention router reads the block input; so does the MLP router unless configured
        # otherwise, and then both can run as one (inference only, see FusedRouters)
        shared_input = config.mlp_router_input == "block_input" and len(self.routers) > 1
        self._fused = FusedRouters(list(self.routers.values())) if shared_input else None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def part(self, name: str) -> nn.Module | None:
        return self.adapter.part(self.base_layer, name)

    def kv_cache(self, kwargs: dict):
        """The KV cache the model passed this layer, or None when it passed none.

        Raises (one line) when a cache is in use upstream but not under ``cache_arg``: a
        renamed argument must never make skipping tokens silently stop writing their K/V.
        """
        cache = kwargs.get(self.cache_arg) if self.cache_arg else None
        if cache is None and (kwargs.get("use_cache") or any(is_cache(v) for v in kwargs.values())):
            raise missing_cache_error(self.base_layer, kwargs)
        return cache

    # -- routing ---------------------------------------------------------------------------
    def _fusable(self) -> bool:
        """The routers can run as one: they share their input and no gradient must reach them."""
        if self._fused is None:
            return False
        return not torch.is_grad_enabled() or not any(p.requires_grad for p in self.routers.parameters())

    def execute_probabilities(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """p(execute) (B, T) of every router of this layer that reads ``hidden``, as inference
        computes it (one fused pass when the routers share their input)."""
        if self._fusable():
            p = self._fused.execute_probability(hidden)
            return {m: p[..., i] for i, m in enumerate(self.routers)}
        return {m: r.execute_probability(hidden) for m, r in self.routers.items()}

    def execute_probability(self, module: str, hidden: torch.Tensor) -> torch.Tensor:
        """p(execute) (B, T) of ``module``'s router: the number inference compares with θ."""
        if self._fusable():
            return self.execute_probabilities(hidden)[module]
        return self.routers[module].execute_probability(hidden)

    def _inference_decisions(self, block_input: torch.Tensor) -> dict[str, torch.Tensor | bool]:
        """Both modules' execute masks (B, T) from one fused router pass, when inference can use it.

        For a single token on the fast path (batch-1 decode) they are Python bools, read from
        the device in one go: the fast path branches on them anyway, and one host read per
        layer costs less than the per-module tensor bookkeeping it replaces.
        """
        state = self.state
        if (
            self.training
            or not state.enabled
            or state.override is not None
            or any((self.layer_idx, m) in state.removed for m in self.routers)
            or not self._fusable()
        ):
            return {}
        execute = self._fused.execute_probability(block_input) >= state.threshold  # (B, T, R)
        if execute.shape[0] * execute.shape[1] == 1 and state.execution == "fast":
            return dict(zip(self.routers, execute.view(-1).tolist(), strict=True))
        return {m: execute[..., i] for i, m in enumerate(self.routers)}

    def gate(
        self, module: str, router_input: torch.Tensor, decided: dict[str, torch.Tensor | bool] | None = None
    ) -> torch.Tensor | bool | None:
        """Execute gate (B, T) for ``module``, or None when the module always executes.

        Training: 0/1 values that carry the router's gradient. Inference: a bool mask (or what
        an override returns), turned into a multiplier only by the masked path. ``decided``
        holds masks already computed for this layer (fused routers); a single token's is a
        Python bool (fast path only).
        """
        state = self.state
        if (self.layer_idx, module) in state.removed:
            g = router_input.new_zeros(router_input.shape[:2])
            if state.enabled:
                state.record(self.layer_idx, module, g)
            return g
        if not state.enabled or module not in self.routers:
            return None
        if state.override is not None:
            g = state.override(self.layer_idx, module, router_input)
        elif self.training:
            g = self.routers[module].sample_gate(router_input, state.tau).to(router_input.dtype)
        elif decided:
            g = decided[module]
        else:  # bool, no noise
            g = self.execute_probability(module, router_input) >= state.threshold
        state.record(self.layer_idx, module, g)
        return g

    def _device_path(self, block_input: torch.Tensor) -> bool:
        """Fast inference on a device whose host reads stop the queue (``fast.reads_are_free``)."""
        state = self.state
        return (
            not self.training
            and state.enabled
            and state.execution == "fast"
            and not reads_are_free(block_input)
        )

    def _plans(self, gates: dict[str, torch.Tensor | bool | None]) -> dict[str, HostPlan]:
        """The ``HostPlan`` of each gate given as a tensor (one host read for all of them);
        Python bools (already on the host), absent and removed modules are left out."""
        masks = {
            m: _as_mask(g)
            for m, g in gates.items()
            if isinstance(g, torch.Tensor) and (self.layer_idx, m) not in self.state.removed
        }
        return plan_decisions(self, masks) if masks else {}

    # -- the branches, as the original layer computes them -------------------------------------
    def attn_branch(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        h = self._norm("attn_pre_norm", x)
        h, _ = self.part("attn")(hidden_states=h, **kwargs)
        return self._norm("attn_post_norm", h)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.part("mlp")(self._norm("mlp_pre_norm", x))
        return self._norm("mlp_post_norm", h)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        norm = self.part(name)
        return x if norm is None else norm(x)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """hidden_states: (B, T, d) block input -> (B, T, d) block output.

        ``kwargs`` are what the model passes its decoder layers (attention_mask,
        position_embeddings, the KV cache, ...); they go to the attention module unchanged.
        """
        block_input = hidden_states
        decided = self._inference_decisions(block_input)
        attn_gate = self.gate("attn", block_input, decided)
        removed = self.state.removed
        shared_input = self.skipgpt_config.mlp_router_input == "block_input"
        device_path = self._device_path(block_input)
        if device_path and shared_input:  # both decisions now, read to the host together
            mlp_gate = self.gate("mlp", block_input, decided)
            plans = self._plans({"attn": attn_gate, "mlp": mlp_gate})
        else:
            plans = self._plans({"attn": attn_gate}) if device_path else {}
        if (self.layer_idx, "attn") in removed:
            pass  # statically removed: no query, no K/V, no output
        elif attn_gate is not None and not self.training and self.state.execution == "fast":
            from .fast import fast_attn_residual  # inference path that really skips work

            hidden_states = fast_attn_residual(
                self, hidden_states, plans.get("attn") or _as_mask(attn_gate), **kwargs
            )
        else:
            out = self.attn_branch(hidden_states, **kwargs)
            hidden_states = hidden_states + (out if attn_gate is None else _as_multiplier(attn_gate, out))

        if not (device_path and shared_input):
            router_input = block_input if shared_input else hidden_states
            mlp_gate = self.gate("mlp", router_input, decided)
            if device_path:
                plans = self._plans({"mlp": mlp_gate})
        if (self.layer_idx, "mlp") in removed:
            return hidden_states
        if mlp_gate is not None and not self.training and self.state.execution == "fast":
            from .fast import fast_mlp_residual

            return fast_mlp_residual(self, hidden_states, plans.get("mlp") or _as_mask(mlp_gate))
        out = self.mlp_branch(hidden_states)
        return hidden_states + (out if mlp_gate is None else _as_multiplier(mlp_gate, out))


def _as_mask(gate: torch.Tensor | bool) -> torch.Tensor | bool:
    """(B, T) execute gate -> bool mask (a single token's Python bool stays as it is)."""
    return gate if isinstance(gate, bool) or gate.dtype == torch.bool else gate > 0.5


def _as_multiplier(gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``gate * out`` for a (B, T) gate and a (B, T, d) module output (the masked path)."""
    return gate.unsqueeze(-1).to(out.dtype) * out
