"""A decoder layer with a router before its attention and before its MLP.

One ``RoutedDecoderLayer`` wraps the model's own layer (``base_layer``) and reads its parts
through a ``LayerAdapter``; the parts are called exactly as the original layer calls them. Its
forward is the decoder block plus a decision per branch::

    x = x + g_attn * attn(x)        # g = the routing policy's execute gate (routing.py)
    x = x + g_mlp * mlp(x)

The executor (``execution.py``) decides how ``g *`` is carried out: the reference multiplies
every token's output by the gate (training needs it: gradients reach the router through g);
the skipping path runs only the executing tokens (``fast.py``), at inference.

A module configured with ``skip_to="adapter"`` has a low-rank ``Substitute`` (``substitutes.py``)
that its skipping tokens run instead of nothing: ``x + g * module(x) + (1 - g) * substitute(x)``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .adapters import LayerAdapter, cache_argument, is_cache, missing_cache_error
from .config import SkipGPTConfig
from .execution import Executor, choose_executor
from .router import FusedRouters, Router
from .routing import REMOVED, Gate, RoutingState
from .substitutes import SUBSTITUTE_PREFIX, Substitute

__all__ = ["RoutedDecoderLayer", "RoutingState", "route_layer", "real_token_hook", "added_parameters"]


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
        self.state = state  # settings, this forward's scratch, statistics: shared by all layers
        self.cache_arg = cache_argument(base_layer)  # "cache" (transformers >= 5.24) or "past_key_values"
        self.routers = nn.ModuleDict({m: Router.from_config(hidden_size, config) for m in config.modules})
        for m, router in self.routers.items():
            if (layer_idx, m) in config.protected_modules:
                router.make_constant(execute=True)  # a protected module: always executes, never trains
        # what skipping tokens run instead of nothing (empty: plain skipping)
        rank = config.rank_for(hidden_size)
        self.substitutes = nn.ModuleDict(
            {m: Substitute(hidden_size, rank, config.substitute_activation) for m in config.substituted}
        )
        # the attention router reads the block input; so does the MLP router unless configured
        # otherwise, and then both can run as one (inference only, see FusedRouters)
        # (one router alone "fuses" too: its inference decision is then one sign test, no softmax)
        shared_input = config.mlp_router_input == "block_input" or len(self.routers) == 1
        self._fused = FusedRouters(list(self.routers.values())) if shared_input and self.routers else None
        self.router_names = tuple(self.routers)  # read per decision without nn.Module lookups

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

    # -- what the routing and the execution paths read -----------------------------------------
    @property
    def settings(self):
        """The model's ``RoutingSettings`` (θ, τ, policy, execution, ...)."""
        return self.state.settings

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(B, T) bool: the real (non-padding) tokens of the current forward; None = all real."""
        return self.state.scratch.token_mask

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's norm ``name`` ('attn_pre_norm', ...) applied to x, or x when it has none."""
        norm = self.part(name)
        return x if norm is None else norm(x)

    @property
    def mlp_reads_block_input(self) -> bool:
        """Whether the MLP router reads the block input (as the attention router does)."""
        return self.skipgpt_config.mlp_router_input == "block_input"

    # -- routers -----------------------------------------------------------------------------------
    def fusable_routers(self) -> bool:
        """The routers can run as one: they share their input and no gradient must reach them."""
        if self._fused is None:
            return False
        return not torch.is_grad_enabled() or not any(p.requires_grad for p in self.routers.parameters())

    def fused_execute_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> p(execute) (B, T, R) of all R routers in one pass (``fusable_routers()``)."""
        return self._fused.execute_probability(hidden)

    def fused_execute(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> the inference decisions ``p(execute) >= θ`` (B, T, R) bool of all R
        routers in one pass (``fusable_routers()``), without a softmax (``FusedRouters.execute``)."""
        return self._fused.execute(hidden, self.settings.threshold)

    def fused_execute_one(self, hidden: torch.Tensor) -> dict[str, bool]:
        """A single token's inference decisions (``fused_execute``) as Python bools, per router."""
        return dict(
            zip(self.router_names, self._fused.execute_one(hidden, self.settings.threshold), strict=True)
        )

    def execute_probabilities(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """p(execute) (B, T) of every router of this layer that reads ``hidden``, as inference
        computes it (one fused pass when the routers share their input)."""
        if self.fusable_routers():
            p = self.fused_execute_probability(hidden)
            return {m: p[..., i] for i, m in enumerate(self.routers)}
        return {m: r.execute_probability(hidden) for m, r in self.routers.items()}

    def execute_probability(self, module: str, hidden: torch.Tensor) -> torch.Tensor:
        """p(execute) (B, T) of ``module``'s router: the number inference compares with θ."""
        if self.fusable_routers():
            return self.execute_probabilities(hidden)[module]
        return self.routers[module].execute_probability(hidden)

    def decide(self, router_input: torch.Tensor, modules: tuple[str, ...], run: Executor) -> dict[str, Gate]:
        """The execute gates of ``modules`` from the routing policy, recorded in the statistics
        (while routing is enabled) and prepared for the executor ``run``.

        Training: (B, T) 0/1 values that carry the router's gradient. Inference: bool masks (a
        single token's may be a Python bool for the skipping executor). None: the module always
        executes; ``REMOVED``: it never runs.
        """
        policy = self.settings.active_policy()
        gates = policy.decide_layer(self, router_input, modules, host_bools=run.host_bools)
        if self.settings.enabled:
            state = self.state
            for m, g in gates.items():
                if g is None:
                    continue
                if g is REMOVED:  # recorded as skipped, so the budget is measured like any routing
                    one_token = run.host_bools and router_input.shape[0] * router_input.shape[1] == 1
                    g = False if one_token else router_input.new_zeros(router_input.shape[:2])
                key = (self.layer_idx, m)
                state.scratch.skip_rates[key] = state.stats.record(
                    key, g, state.scratch, keep=self.settings.keep_decisions
                )
        return run.prepare(self, gates)

    # -- the branches, as the original layer computes them -------------------------------------
    def attn_branch(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        h = self.norm("attn_pre_norm", x)
        h, _ = self.part("attn")(hidden_states=h, **kwargs)
        return self.norm("attn_post_norm", h)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.part("mlp")(self.norm("mlp_pre_norm", x))
        return self.norm("mlp_post_norm", h)

    def substitute_branch(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """(..., d) block state -> (..., d): ``module``'s substitute on its normed input (the
        module's pre-norm, as the module reads it); what a skipping token adds to the residual."""
        return self.substitutes[module](self.norm(f"{module}_pre_norm", x))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """hidden_states: (B, T, d) block input -> (B, T, d) block output.

        ``kwargs`` are what the model passes its decoder layers (attention_mask,
        position_embeddings, the KV cache, ...); they go to the attention module unchanged.
        """
        x = hidden_states
        run = choose_executor(self, x)  # reference (masked) or skipping, for this forward
        # At inference both decisions come first when both routers read the block input: one
        # fused router pass, and on a GPU one host read for the layer. Training decides the MLP
        # after the attention ran, in the order the random draws have always been taken.
        together = self.mlp_reads_block_input and not self.training
        gates = self.decide(x, ("attn", "mlp") if together else ("attn",), run)
        x = run.attn_residual(self, x, gates["attn"], **kwargs)
        if not together:
            router_input = hidden_states if self.mlp_reads_block_input else x
            gates = self.decide(router_input, ("mlp",), run)
        return run.mlp_residual(self, x, gates["mlp"])


def added_parameters(layers) -> dict[str, nn.Parameter]:
    """Every parameter routing adds to ``layers`` (routed layers), by the name it is saved under in
    ``routers.safetensors``: ``layers.{i}.{module}.{param}`` for the routers,
    ``substitutes.layers.{i}.{module}.{param}`` for the substitutes (none unless a module skips to
    an adapter). ``SkipGPTModel`` and an export's remote code both read and write these names."""
    routers = {
        f"layers.{layer.layer_idx}.{name}": p
        for layer in layers
        for name, p in layer.routers.named_parameters()
    }
    substitutes = {
        f"{SUBSTITUTE_PREFIX}layers.{layer.layer_idx}.{name}": p
        for layer in layers
        for name, p in layer.substitutes.named_parameters()
    }
    return {**routers, **substitutes}


def route_layer(
    layer: nn.Module,
    layer_idx: int,
    adapter: LayerAdapter,
    config: SkipGPTConfig,
    hidden_size: int,
    state: RoutingState,
    device: torch.device,
) -> RoutedDecoderLayer:
    """``layer`` wrapped with its routers (and substitutes), which start from the config alone
    (seeded by ``config.seed`` and the layer index, not by the global RNG) and sit in float32 on
    ``device`` (the layer's own). What ``SkipGPTModel`` and an export's remote code both do."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed * 7919 + layer_idx)
        routed = RoutedDecoderLayer(layer, layer_idx, adapter, config, hidden_size, state)
    routed.routers.to(device=device)
    routed.substitutes.to(device=device)
    return routed


def real_token_hook(state: RoutingState):
    """A forward pre-hook (``with_kwargs``) for the HF model: each forward starts the routing
    scratch with which tokens are real, (B, T) from the attention mask (None: all of them), so
    padding never counts in the statistics."""

    def capture(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        real = None if x is None or mask is None or mask.dim() != 2 else mask[:, -x.shape[1] :].bool()
        state.scratch.begin(real)

    return capture
