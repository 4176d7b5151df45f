"""Who decides which tokens run a module, and what is remembered about it.

Three objects, shared by all routed layers of one model (``SkipGPTModel``):

* ``RoutingSettings`` — what the user chooses: θ, τ, the policy, the execution
  (``"fast"``/``"masked"``), dense on/off, the modules removed for good (LLM-Drop). θ is stored
  in the router config (``SkipGPTConfig.threshold``), so the θ inference uses is the θ saved.
* ``ForwardScratch`` — what one forward needs and then forgets: which tokens are real (the
  attention mask) and each (layer, module)'s skip rate (differentiable in training, for the loss).
* ``RoutingStats`` — decisions added up over many forwards (padding excluded), for
  ``sparsity_stats``. On a device whose reads stop its queue (``fast.reads_are_free`` is False:
  a GPU) the counts stay on the device until they are asked for: one read for all of them.

A ``RoutingPolicy`` turns a layer's router input into execute gates. Policies are objects in a
registry (``POLICIES``, ``make_policy``), never flags of the layer:

============  ==================================================================================
``learned``   the routers: straight-through Gumbel in training, ``p(execute) >= θ`` at inference
``random``    each (token, module) skips with a fixed probability (the trivial baseline)
``topk``      Mixture-of-Depths capacity: the top ``1 - s`` real tokens of each sequence execute
``override``  a plain callable ``(layer_idx, module, hidden) -> (B, T) gate`` (tests, research)
``static``    fixed (layer, module) pairs skip for every token, the rest execute; no router runs
============  ==================================================================================

``RemovedModules`` wraps any of them: its (layer, module) pairs never run (an attention writes
no K/V); ``DensePolicy`` (routing disabled) runs everything and evaluates no router.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .config import SkipGPTConfig
from .errors import SkipGPTError
from .fast import reads_are_free

__all__ = [
    "Gate",
    "REMOVED",
    "RoutingPolicy",
    "POLICIES",
    "register_policy",
    "make_policy",
    "LearnedPolicy",
    "RandomPolicy",
    "TopKPolicy",
    "OverridePolicy",
    "DensePolicy",
    "StaticPolicy",
    "RemovedModules",
    "EXECUTIONS",
    "RoutingSettings",
    "ForwardScratch",
    "RoutingStats",
    "RoutingState",
]


class _Removed:
    """The gate of a module that does not exist any more (LLM-Drop): nothing runs, not even K/V."""

    def __repr__(self) -> str:
        return "REMOVED"


REMOVED = _Removed()

# A module's execute gate: (B, T) tensor (bool at inference, 0/1 floats carrying a gradient in
# training), a Python bool for a single token decided on the host, None = always executes
# (not routed, or routing disabled), or REMOVED.
Gate = torch.Tensor | bool | None | _Removed

EXECUTIONS = ("fast", "masked")  # inference: skip work for real, or run all and multiply by the gate


# -- policies --------------------------------------------------------------------------------------
class RoutingPolicy:
    """Decides, per token, whether a routed module executes.

    ``decide(layer, module, hidden)`` -> (B, T) gate for a module that has a router;
    ``layer`` is the ``RoutedDecoderLayer`` (its ``layer_idx``, ``routers``, ``training``,
    ``settings`` and ``token_mask``), ``hidden`` (B, T, d) the router's input.
    ``decide_layer`` decides several modules of one layer at once (a policy may share work
    between them); by default it asks ``decide`` once per routed module, in the given order.
    """

    name: ClassVar[str] = ""

    def decide(self, layer, module: str, hidden: torch.Tensor) -> Gate:
        raise NotImplementedError

    def decide_layer(
        self, layer, hidden: torch.Tensor, modules: tuple[str, ...], host_bools: bool = False
    ) -> dict[str, Gate]:
        """Gates of ``modules``; None for a module without a router. ``host_bools``: the caller
        takes a single token's decisions as Python bools (a policy may return them)."""
        return {m: self.decide(layer, m, hidden) if m in layer.routers else None for m in modules}


POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(name: str):
    """Class decorator: make a ``RoutingPolicy`` available as ``make_policy(name, ...)``."""

    def wrap(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
        cls.name = name
        POLICIES[name] = cls
        return cls

    return wrap


def make_policy(name: str, **kwargs: Any) -> RoutingPolicy:
    """A registered policy by name, e.g. ``make_policy("random", rates=0.4, seed=0)``."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise SkipGPTError(f"unknown routing policy {name!r}; accepted: {sorted(POLICIES)}") from None
    return cls(**kwargs)


@register_policy("learned")
class LearnedPolicy(RoutingPolicy):
    """The trained routers. Training: hard straight-through Gumbel-softmax at τ (0/1 gates that
    carry the router's gradient). Inference: ``p(execute) >= θ``, no noise, both routers of a
    layer in one fused pass when they read the same input."""

    def decide(self, layer, module: str, hidden: torch.Tensor) -> Gate:
        if layer.training:
            return layer.routers[module].sample_gate(hidden, layer.settings.tau).to(hidden.dtype)
        return layer.execute_probability(module, hidden) >= layer.settings.threshold

    def decide_layer(self, layer, hidden, modules, host_bools=False):
        names = layer.router_names
        if layer.training or not layer.fusable_routers() or any(m not in modules for m in names):
            return super().decide_layer(layer, hidden, modules, host_bools)
        if host_bools and hidden.shape[0] * hidden.shape[1] == 1:
            # a single token: one host read for the layer, the fast path branches on it anyway
            gates = layer.fused_execute_one(hidden)
        else:
            execute = layer.fused_execute(hidden)  # (B, T, R)
            gates = {m: execute[..., i] for i, m in enumerate(names)}
        return {m: gates.get(m) for m in modules}


@register_policy("random")
class RandomPolicy(RoutingPolicy):
    """Each (token, module) skips with probability ``rates``: one number, or a dict keyed by
    ``(layer, module)`` or by module name (0 for those not given). Drawn from a private generator
    on the hidden states' device (no host copy on a GPU): the same seed gives the same routing.
    With ``router_overhead`` the layer's routers still run as inference runs them and their
    decisions are discarded, so timings include what trained routers cost."""

    def __init__(
        self,
        rates: float | dict[tuple[int, str], float] | dict[str, float],
        seed: int = 0,
        router_overhead: bool = False,
    ):
        self.rates, self.seed, self.router_overhead = rates, seed, router_overhead
        self._generators: dict[torch.device, torch.Generator] = {}  # one per device, made on first use

    def rate(self, layer_idx: int, module: str) -> float:
        if isinstance(self.rates, float | int):
            return float(self.rates)
        if (layer_idx, module) in self.rates:
            return float(self.rates[(layer_idx, module)])
        return float(self.rates.get(module, 0.0))

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return gen

    def decide(self, layer, module: str, hidden: torch.Tensor) -> Gate:
        if self.router_overhead:
            if not layer.fusable_routers():
                _discarded = layer.execute_probability(module, hidden) >= layer.settings.threshold
            elif module == next(iter(layer.routers)):  # one pass decides the layer, at its first router
                _discarded = layer.fused_execute(hidden)
        draw = torch.rand(hidden.shape[:2], generator=self._generator(hidden.device), device=hidden.device)
        return draw >= self.rate(layer.layer_idx, module)


@register_policy("topk")
class TopKPolicy(RoutingPolicy):
    """Mixture-of-Depths capacity routing: per sequence and module, the top ``n - round(s·n)``
    real tokens by router score execute (``n`` real tokens, ``s = skip_rate``); padding never.

    Returns a bool gate at inference, ``hard + p - p.detach()`` (0/1 values, the router's
    gradient) when gradients are enabled and ``straight_through``. Not causal: a token's
    selection depends on later tokens' scores.
    """

    def __init__(self, skip_rate: float, straight_through: bool = True):
        if not 0.0 <= float(skip_rate) < 1.0:
            raise SkipGPTError(f"MoD skip rate must be in [0, 1), got {skip_rate!r}")
        self.skip_rate, self.straight_through = float(skip_rate), straight_through

    def decide(self, layer, module: str, hidden: torch.Tensor) -> Gate:
        p = layer.execute_probability(module, hidden)  # (B, T)
        mask = layer.token_mask
        real = (
            mask.to(p.device)
            if mask is not None and mask.shape == p.shape
            else torch.ones_like(p, dtype=torch.bool)
        )
        n_real = real.sum(1, keepdim=True)  # (B, 1)
        n_exec = n_real - torch.round(n_real * self.skip_rate).long()
        score = p.detach().masked_fill(~real, float("-inf"))
        rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1, stable=True)  # 0 = best
        hard = (rank < n_exec) & real
        if self.straight_through and torch.is_grad_enabled():
            return hard.to(p.dtype) + p - p.detach()
        return hard


# override(layer_idx, module, hidden (B, T, d)) -> execute gate (B, T)
RoutingOverride = Callable[[int, str, torch.Tensor], torch.Tensor]


@register_policy("override")
class OverridePolicy(RoutingPolicy):
    """A plain callable ``fn(layer_idx, module, hidden) -> (B, T) gate`` as a policy
    (``SkipGPTModel.routing(override=fn)``)."""

    def __init__(self, fn: RoutingOverride):
        self.fn = fn

    def decide(self, layer, module: str, hidden: torch.Tensor) -> Gate:
        return self.fn(layer.layer_idx, module, hidden)


@register_policy("static")
class StaticPolicy(RoutingPolicy):
    """The modules ``skipped`` ((layer, module) pairs) skip for every token (to their substitute,
    if they have one), every other module executes, and no router is evaluated: what a static
    method (LLM-Drop, the static substitute baseline) costs when it is deployed, without the
    price of constant routers. Only the skipped modules' decisions reach the statistics (the
    others decide nothing), so count a static method's sparsity from its choice."""

    def __init__(self, skipped=frozenset()):
        self.skipped = frozenset((int(i), str(m)) for i, m in skipped)

    def decide(self, layer, module: str, hidden: torch.Tensor) -> Gate:
        if (layer.layer_idx, module) not in self.skipped:
            return None
        return torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)

    def decide_layer(self, layer, hidden, modules, host_bools=False):
        if host_bools and hidden.shape[0] * hidden.shape[1] == 1:
            return {m: None if (layer.layer_idx, m) not in self.skipped else False for m in modules}
        return {m: self.decide(layer, m, hidden) for m in modules}


class DensePolicy(RoutingPolicy):
    """Routing disabled: every module executes and no router is evaluated."""

    def decide(self, layer, module, hidden):
        return None


class RemovedModules(RoutingPolicy):
    """``inner``, except that the (layer, module) pairs ``removed`` never run (LLM-Drop)."""

    def __init__(self, removed: frozenset[tuple[int, str]], inner: RoutingPolicy):
        self.removed, self.inner = removed, inner

    def decide(self, layer, module, hidden):
        if (layer.layer_idx, module) in self.removed:
            return REMOVED
        return self.inner.decide(layer, module, hidden) if module in layer.routers else None

    def decide_layer(self, layer, hidden, modules, host_bools=False):
        if not any((layer.layer_idx, m) in self.removed for m in modules):
            return self.inner.decide_layer(layer, hidden, modules, host_bools)
        return {m: self.decide(layer, m, hidden) for m in modules}


_LEARNED, _DENSE = LearnedPolicy(), DensePolicy()


# -- settings --------------------------------------------------------------------------------------
@dataclass(eq=False)
class RoutingSettings:
    """What the user chooses; the routed layers read it on every forward.

    ``policy`` None means the learned routers. ``enabled=False`` is the dense model (no router
    runs; removed modules stay removed). ``execution`` picks the inference path (training always
    runs the masked reference). ``keep_decisions`` keeps every (B, T) decision in
    ``RoutingStats.decisions``. θ (``threshold``) lives in ``config`` and is set through one
    validating setter.
    """

    config: SkipGPTConfig
    tau: float = 1.0
    enabled: bool = True
    execution: str = "fast"
    policy: RoutingPolicy | None = None
    keep_decisions: bool = False
    # (layer, module) pairs statically removed (LLM-Drop): never run, an attention writes no K/V
    removed: frozenset[tuple[int, str]] = frozenset()
    _active: tuple | None = field(default=None, repr=False)

    @property
    def threshold(self) -> float:
        """θ: a module executes at inference iff p(execute) >= θ (the saved ``config.threshold``)."""
        return self.config.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.config.threshold = SkipGPTConfig(threshold=value).threshold  # validated as the config does

    @property
    def override(self) -> RoutingOverride | None:
        """The callable of an ``OverridePolicy`` (compatibility), else None."""
        return self.policy.fn if isinstance(self.policy, OverridePolicy) else None

    @override.setter
    def override(self, fn: RoutingOverride | None) -> None:
        self.policy = None if fn is None else OverridePolicy(fn)

    def active_policy(self) -> RoutingPolicy:
        """The policy a forward runs: the chosen one (dense when disabled), minus removed modules."""
        base = (self.policy or _LEARNED) if self.enabled else _DENSE
        if not self.removed:
            return base
        if self._active is None or self._active[0] is not base or self._active[1] is not self.removed:
            self._active = (base, self.removed, RemovedModules(self.removed, base))
        return self._active[2]


# -- per-forward scratch ---------------------------------------------------------------------------
@dataclass(eq=False)
class ForwardScratch:
    """What one forward needs: ``token_mask`` (B, T) bool of its real tokens (None: all real),
    and ``skip_rates`` of each (layer, module) it decided (training: differentiable tensors;
    inference: floats, or 0-dim tensors on the device path)."""

    token_mask: torch.Tensor | None = None
    skip_rates: dict[tuple[int, str], torch.Tensor | float] = field(default_factory=dict)
    # single_token_is_real's cache: the mask it last read, and what it found
    _real_mask: torch.Tensor | None = field(default=None, repr=False)
    _real: bool = field(default=True, repr=False)

    def begin(self, token_mask: torch.Tensor | None) -> None:
        """A new forward starts: forget the last one's rates, remember which tokens are real."""
        self.skip_rates.clear()
        self.token_mask = token_mask

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


# -- statistics ------------------------------------------------------------------------------------
@dataclass(eq=False)
class RoutingStats:
    """Decisions added up since ``reset``: skipped and decided real tokens per (layer, module),
    and, when asked, the decisions themselves (``decisions[(layer, module)]``: (B, T) bool on the
    CPU, one per forward)."""

    decisions: dict[tuple[int, str], list[torch.Tensor]] = field(default_factory=dict)
    _skipped: dict[tuple[int, str], float] = field(default_factory=dict, repr=False)
    _counted: dict[tuple[int, str], float] = field(default_factory=dict, repr=False)
    # counts not yet read from the device: key -> [skipped, counted] 0-dim tensors (or a float count)
    _on_device: dict[tuple[int, str], list] = field(default_factory=dict, repr=False)

    def reset(self) -> None:
        self._skipped.clear()
        self._counted.clear()
        self._on_device.clear()
        self.decisions.clear()

    @property
    def skipped(self) -> dict[tuple[int, str], float]:
        """(layer, module) -> skipped real tokens since ``reset``."""
        self._read_device_counts()
        return self._skipped

    @property
    def counted(self) -> dict[tuple[int, str], float]:
        """(layer, module) -> real tokens decided since ``reset``."""
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

    def record(
        self, key: tuple[int, str], gate: torch.Tensor | bool, scratch: ForwardScratch, keep: bool = False
    ) -> torch.Tensor | float:
        """Add one decision of ``key`` = (layer, module); returns its skip rate over the real
        tokens of this forward. gate: (B, T) execute gate, bool or 0/1 values (differentiable
        in training), or a Python bool for a one-token forward decided on the host."""
        if isinstance(gate, bool):
            n = 1.0 if scratch.single_token_is_real() else 0.0
            skips = 0.0 if gate else n
            rate = skips
        elif not gate.requires_grad and not reads_are_free(gate):
            rate = self._count_on_device(key, gate, scratch.token_mask)
            skips = n = None
        else:
            skips, n, rate = self._count(gate, scratch.token_mask)
        if skips is not None:
            self._skipped[key] = self._skipped.get(key, 0.0) + skips
            self._counted[key] = self._counted.get(key, 0.0) + n
        if keep:
            kept = torch.tensor([[gate]]) if isinstance(gate, bool) else (gate.detach() > 0.5).cpu()
            self.decisions.setdefault(key, []).append(kept)
        return rate

    def _count_on_device(self, key, gate: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Inference on a GPU: add a (B, T) gate's skipped and real tokens to running totals on
        the device (no host read); returns the rate as a 0-dim tensor."""
        if mask is not None and mask.shape != gate.shape:
            mask = None
        executed = gate if gate.dtype == torch.bool else gate > 0.5
        if mask is None:
            n = gate.numel()
            skips = n - executed.count_nonzero()
            rate = skips / max(n, 1)
        else:
            real = mask.to(device=gate.device, dtype=torch.bool)
            n = real.count_nonzero()
            skips = (~executed & real).count_nonzero()
            rate = skips / n.clamp_min(1)
        acc = self._on_device.get(key)
        if acc is None:
            self._on_device[key] = [skips, n]
        else:
            acc[0], acc[1] = acc[0] + skips, acc[1] + n
        return rate

    @staticmethod
    def _count(gate: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float, torch.Tensor | float]:
        """(skipped, real, rate) of a (B, T) gate, padding excluded; the rate is differentiable
        in training."""
        if mask is not None and mask.shape != gate.shape:
            mask = None
        if gate.requires_grad:  # training: the loss needs the differentiable rate
            valid = torch.ones_like(gate) if mask is None else mask.to(gate.dtype)
            n_t = valid.sum()
            skips_t = ((1.0 - gate) * valid).sum()
            return float(skips_t.detach()), float(n_t), skips_t / n_t.clamp_min(1.0)
        # inference: plain counts, one host sync
        executed = gate if gate.dtype == torch.bool else gate > 0.5
        if mask is None:
            n = float(gate.numel())
            skips = n - float(executed.count_nonzero())
        else:
            n = float(mask.count_nonzero())
            skips = float((~executed & mask.to(torch.bool)).count_nonzero())
        return skips, n, skips / max(n, 1.0)


# -- the three together ----------------------------------------------------------------------------
_SETTINGS = ("tau", "threshold", "enabled", "execution", "policy", "override", "keep_decisions", "removed")
_SCRATCH = ("token_mask", "skip_rates", "single_token_is_real")
_STATS = ("skipped", "counted", "decisions")


class RoutingState:
    """The routing objects of one model: ``settings``, ``scratch`` (this forward), ``stats``.

    For compatibility, their attributes also read (and the settings and the token mask also
    write) through this object: ``state.threshold``, ``state.token_mask``, ``state.skipped``, ...
    """

    def __init__(self, num_layers: int, config: SkipGPTConfig):
        object.__setattr__(self, "num_layers", num_layers)
        object.__setattr__(self, "settings", RoutingSettings(config))
        object.__setattr__(self, "scratch", ForwardScratch())
        object.__setattr__(self, "stats", RoutingStats())

    def reset_stats(self) -> None:
        self.stats.reset()

    def _owner(self, name: str):
        if name in _SETTINGS:
            return self.settings
        if name in _SCRATCH:
            return self.scratch
        if name in _STATS:
            return self.stats
        return None

    def __getattr__(self, name: str):
        owner = self._owner(name)
        if owner is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(owner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        owner = self._owner(name)
        if owner is None or name in _STATS:
            raise AttributeError(f"routing state attribute {name!r} cannot be set")
        setattr(owner, name, value)

    def __repr__(self) -> str:
        return f"RoutingState(num_layers={self.num_layers}, {self.settings!r})"
