"""A FLOP cost model of a decoder-only LM, and the ideal speedup of a realised routing.

Per token, per decoder layer, counting one multiply-add as 2 FLOPs (norms, rotary, softmax,
activations, residual adds and the embedding lookup are left out: they are a few percent):

* attention projections: q ``2·d·H·hd``, k and v ``2·2·d·KVH·hd``, o ``2·H·hd·d``;
* attention over the context: ``2·2·H·hd·c`` (scores and weighted values), ``c`` = keys the
  token attends to (its position + 1, capped by a sliding window);
* MLP: ``2·m·d·I`` with ``m`` = 3 matrices for gated (SwiGLU) MLPs, 2 otherwise;
* lm_head: ``2·d·V`` per token whose logits are computed.

A token that skips attention at a layer saves q, o and the attention over its context; its
k and v are still computed (other tokens may attend to it). A token that skips the MLP saves
the MLP. Routers cost ``2·(d·r + 2r)`` per (token, module) (``2·2d`` for a linear router);
that is overhead of the method and is *not* part of the ideal speedup:

    ideal speedup = dense cost / (dense cost - cost of the work actually skipped).

A module that skips to a substitute (``substitutes.py``, rank r) charges each skipping token
``2·(2·d·r + d)`` (down, up, bias): the work skipped is the module's cost less its substitute's
(``routing_cost``: ``skipped_flops`` is net of ``substitute_flops``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

__all__ = ["CostModel", "ForwardRecord", "routing_cost", "routing_traffic"]


@dataclass(frozen=True)
class CostModel:
    """Dimensions of a decoder-only LM, read from its HF config."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    mlp_matrices: int = 3
    windows: tuple[int | None, ...] = field(default=())  # sliding window per layer (None = full)
    router_hidden: int = 0
    substitute_ranks: tuple[tuple[str, int], ...] = ()  # (module, rank) of modules with substitutes

    @classmethod
    def from_config(
        cls,
        config,
        router_hidden: int | None = None,
        mlp_matrices: int = 3,
        substitute_ranks: dict[str, int] | None = None,
    ) -> CostModel:
        """``config``: a HF ``PretrainedConfig`` (the text config of a multimodal one is used).

        ``mlp_matrices``: 3 for gated MLPs (gate, up, down: every family skipgpt supports), 2 for
        plain ones. ``router_hidden``: the routers' hidden width (None = d // 4, 0 = linear).
        ``substitute_ranks``: module -> rank of the substitute its skipping tokens run.
        """
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        d = config.hidden_size
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        hd = getattr(config, "head_dim", None) or d // heads
        layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types is not None:
            windows = tuple(window if t == "sliding_attention" else None for t in types)
        else:
            windows = (window,) * layers
        return cls(
            hidden=d,
            heads=heads,
            kv_heads=kv,
            head_dim=hd,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            layers=layers,
            mlp_matrices=mlp_matrices,
            windows=windows,
            router_hidden=d // 4 if router_hidden is None else router_hidden,
            substitute_ranks=tuple(sorted((substitute_ranks or {}).items())),
        )

    @classmethod
    def for_model(cls, model) -> CostModel:
        """The cost model of a ``SkipGPTModel``: its base's dimensions, its routers' width, its
        substitutes' ranks."""
        from .substitutes import substitute_ranks

        return cls.from_config(
            model.config,
            router_hidden=model.skipgpt_config.router_hidden,
            substitute_ranks=substitute_ranks(model),
        )

    # -- per token, per layer (FLOPs) -------------------------------------------------------------
    @property
    def q_o(self) -> int:
        return 2 * 2 * self.hidden * self.heads * self.head_dim

    @property
    def k_v(self) -> int:
        return 2 * 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def mlp(self) -> int:
        return 2 * self.mlp_matrices * self.hidden * self.intermediate

    @property
    def lm_head(self) -> int:
        return 2 * self.hidden * self.vocab

    @property
    def router(self) -> int:
        r = self.router_hidden
        return 2 * (self.hidden * r + 2 * r) if r else 2 * 2 * self.hidden

    def substitute(self, module: str) -> int:
        """FLOPs per skipping token of ``module``'s substitute (0: plain skipping)."""
        r = dict(self.substitute_ranks).get(module, 0)
        return 2 * (2 * self.hidden * r + self.hidden) if r else 0

    def context(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Keys attended at ``layer`` by tokens at 0-based ``positions``."""
        c = positions + 1
        w = self.windows[layer] if self.windows else None
        return c.clamp(max=w) if w else c

    def attention_over(self, ctx: torch.Tensor) -> torch.Tensor:
        return 2 * 2 * self.heads * self.head_dim * ctx.to(torch.float64)

    def describe(self) -> str:
        return (
            "FLOPs = 2 x multiply-adds, per token and layer: attention projections q+o "
            f"{self.q_o / 1e6:.3f} MFLOP and k+v {self.k_v / 1e6:.3f} MFLOP (always run), attention over "
            f"the context 4*H*hd*c = {4 * self.heads * self.head_dim} FLOP per key c (c = position+1"
            f"{', sliding windows' if any(self.windows) else ''}), MLP {self.mlp / 1e6:.3f} MFLOP; lm_head "
            f"{self.lm_head / 1e6:.3f} MFLOP per token with logits; norms/rotary/softmax ignored. "
            "A skipped attention saves q+o and its attention over the context; a skipped MLP saves the "
            "MLP"
            + "".join(
                f"; a skipped {m} runs its rank-{r} substitute ({self.substitute(m) / 1e6:.3f} MFLOP, charged)"
                for m, r in self.substitute_ranks
            )
            + ". ideal speedup = dense / (dense - skipped). Router overhead "
            f"{self.router / 1e6:.3f} MFLOP per (token, module) is not in the ideal."
        )


@dataclass
class ForwardRecord:
    """One forward of a benchmark: its routing and where its tokens sit.

    ``execute`` maps (layer, module) to the (B, T) execute decisions (absent = always
    executes, e.g. a dense forward); ``past`` is the number of cached tokens before it;
    ``logits_tokens`` how many tokens got logits; ``token_mask`` (B, T) marks real tokens.
    """

    batch: int
    length: int
    past: int = 0
    logits_tokens: int | None = None
    execute: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None


def routing_cost(
    cost: CostModel, forwards: Iterable[ForwardRecord], removed: Iterable[tuple[int, str]] = ()
) -> dict[str, float]:
    """Dense FLOPs, skipped FLOPs (net of the substitutes that skipping tokens run), substitute
    FLOPs, router FLOPs and the ideal speedup over some forwards. ``removed``: (layer, module)
    pairs gone for good (LLM-Drop, ShortGPT's layers): a removed attention saves its K/V
    projections too, where a routed skip still writes K/V."""
    gone = {(int(i), str(m)) for i, m in removed}
    dense = skipped = router = substitute = 0.0
    for f in forwards:
        real = (
            f.token_mask.bool()
            if f.token_mask is not None
            else torch.ones(f.batch, f.length, dtype=torch.bool)
        )
        n_real = int(real.sum())
        positions = (f.past + torch.arange(f.length)).expand(f.batch, f.length)
        logits = n_real if f.logits_tokens is None else f.logits_tokens
        dense += logits * cost.lm_head
        for layer in range(cost.layers):
            attn_ctx = cost.attention_over(cost.context(layer, positions))
            dense += n_real * (cost.q_o + cost.k_v + cost.mlp) + float(attn_ctx[real].sum())
            ex_attn = f.execute.get((layer, "attn"))
            if ex_attn is not None:
                skip = real & ~ex_attn.bool().cpu()
                n_skip = int(skip.sum())
                skipped += n_skip * (cost.q_o - cost.substitute("attn")) + float(attn_ctx[skip].sum())
                if (layer, "attn") in gone:
                    skipped += n_skip * cost.k_v
                substitute += n_skip * cost.substitute("attn")
                router += n_real * cost.router
            ex_mlp = f.execute.get((layer, "mlp"))
            if ex_mlp is not None:
                n_skip = int((real & ~ex_mlp.bool().cpu()).sum())
                skipped += n_skip * (cost.mlp - cost.substitute("mlp"))
                substitute += n_skip * cost.substitute("mlp")
                router += n_real * cost.router
    ideal = dense / (dense - skipped) if dense > skipped else float("inf")
    return {
        "dense_flops": dense,
        "skipped_flops": skipped,
        "router_flops": router,
        "substitute_flops": substitute,
        "skipped_fraction": skipped / dense if dense else 0.0,
        "ideal_speedup": ideal,
    }


def routing_traffic(
    cost: CostModel, forwards: Iterable[ForwardRecord], bytes_per_param: int = 4
) -> dict[str, float]:
    """A memory-traffic view of the same routing, for decoding (which is bandwidth-bound on a CPU).

    Per forward, a module's weights are read once if *any* real token of the batch executes it
    (k, v and lm_head always), and each executing token reads the K/V of its context. The
    ratio dense / (dense - saved) bounds the speedup of a bandwidth-bound step: with 8
    sequences skipping independently, a module is rarely skipped by all of them.
    """
    d, hd = cost.hidden, cost.head_dim
    q_o = 2 * d * cost.heads * hd * bytes_per_param
    k_v = 2 * d * cost.kv_heads * hd * bytes_per_param
    mlp = cost.mlp_matrices * d * cost.intermediate * bytes_per_param
    head = d * cost.vocab * bytes_per_param
    kv_per_key = 2 * cost.kv_heads * hd * bytes_per_param
    dense = saved = 0.0
    for f in forwards:
        real = (
            f.token_mask.bool()
            if f.token_mask is not None
            else torch.ones(f.batch, f.length, dtype=torch.bool)
        )
        positions = (f.past + torch.arange(f.length)).expand(f.batch, f.length)
        dense += head
        for layer in range(cost.layers):
            ctx = cost.context(layer, positions).to(torch.float64) * kv_per_key
            dense += q_o + k_v + mlp + float(ctx[real].sum())
            ex_attn = f.execute.get((layer, "attn"))
            if ex_attn is not None:
                run = real & ex_attn.bool().cpu()
                saved += float(ctx[real & ~run].sum()) + (0.0 if bool(run.any()) else q_o)
            ex_mlp = f.execute.get((layer, "mlp"))
            if ex_mlp is not None and not bool((real & ex_mlp.bool().cpu()).any()):
                saved += mlp
    return {
        "dense_bytes": dense,
        "saved_bytes": saved,
        "ideal_speedup": dense / (dense - saved) if dense > saved else float("inf"),
    }
