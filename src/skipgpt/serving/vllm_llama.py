"""``SkipGPTLlamaForCausalLM``: vLLM's Llama with a router before every attention and MLP.

The routing lives in three mixins (``RoutedLayerMixin``, ``RoutedModelMixin``,
``RoutedCausalLMMixin``) placed before vLLM's own classes; ``serving.vllm_qwen2`` puts the same
mixins before vLLM's Qwen2 classes.

vLLM runs a model on a *flattened* batch: ``positions`` (N,) and hidden states (N, d) hold the
tokens of every scheduled sequence (prefill chunks and decode steps together). Per decoder layer,
for the block input ``x`` (N, d):

* the routers read ``x`` (float32, as skipgpt's ``FusedRouters``: one pass for both modules when
  the MLP router also reads the block input) and a token executes a module iff p(execute) >= θ;
* attention: every token's K/V go into the paged cache (a skipping token's K/V is read by the
  later tokens that attend to it). When *no* token of the batch executes the attention (batch-1
  decode, say), only that happens: ``input_layernorm``, a K/V-only projection (``kv_only``, the
  k/v rows of ``qkv_proj``, copied at load), rotary on the keys and vLLM's own cache write
  (``unified_kv_cache_update``); no query, attention kernel or ``o_proj`` runs. Otherwise
  ``qkv_proj`` and rotary run for every token and vLLM's ``Attention`` op writes the K/V and
  computes the attention of every query: its metadata (query start offsets, slot mapping, the
  sequences' lengths) is built by the model runner for all N scheduled tokens before the model
  runs, and a sub-batch of queries would need metadata the model cannot rebuild. Only the
  executing tokens' attention outputs go through ``o_proj`` and are added to the residual stream;
  a skipping token's stream is unchanged;
* MLP: the block state is normed (``post_attention_layernorm``) and only the executing tokens run
  the MLP and are added back;
* substitutes (a folder trained with ``skip_to=adapter``): the tokens that skip a module run its
  low-rank substitute (float32, skipgpt's ``Substitute``) on the module's normed input, added back
  from the same block state the module reads.

"Only the executing tokens" is a gather, run and ``index_add`` when at least ``GATHER_MIN_SKIPS``
tokens of the forward skip the module; with fewer, the module runs on every token and the skipping
rows are masked off (``torch.where``: the same result, without index ops that would cost more than
the rows they save). Forwards of the dense window's sizes run every module of every token: on a CPU
such a step costs about the same whatever the number of executing tokens, so routing it would cost
more than it saves. The window is the one ``skipgpt serve-tune`` measured on this machine for the
served θ (``serving.tune``), else ``DENSE_TOKENS`` (decode steps of 2-16 sequences); ``skipgpt
serve --dense-tokens`` overrides both.

vLLM's Llama layer passes ``(hidden, residual)`` pairs and fuses the residual add into the next
RMSNorm; this model keeps the plain residual stream instead (``x`` in, ``x`` out), so a skip is
exactly skipgpt's "block residual unchanged". The model is never torch.compiled (the gathers have
data-dependent shapes): run vLLM with ``--enforce-eager`` (``skipgpt serve`` does).

``skipgpt_state.routing = False`` (``LLM.apply_model``) runs vLLM's own Llama layers on the same
weights instead: the dense model in the same process, what an A/B benchmark compares against
(``benchmarks/serve_ab.py``).

θ comes from the folder (``config.json`` -> ``skipgpt.threshold``); ``--hf-overrides
'{"skipgpt_threshold": T}'`` overrides it (``skipgpt serve --threshold``). With the environment
variable ``SKIPGPT_STATS_FILE`` set, the model writes its routing statistics (tokens, skips per
layer and module, dense and skipped FLOPs by ``skipgpt.costs``) to that JSON file at most every
``STATS_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import extract_layer_index

from ..config import SkipGPTConfig
from ..costs import CostModel
from ..errors import SkipGPTError
from ..router import FusedRouters, Router
from ..substitutes import SUBSTITUTE_PREFIX, Substitute
from .prepare import ROUTERS_SUBDIR
from .tune import DENSE_TOKENS, checked_window, served_window

__all__ = [
    "SkipGPTLlamaForCausalLM",
    "ServeRoutingState",
    "STATS_ENV",
    "STATS_INTERVAL_S",
    "GATHER_MIN_SKIPS",
    "DENSE_TOKENS",
]

STATS_ENV = "SKIPGPT_STATS_FILE"
STATS_INTERVAL_S = 0.5
# A module runs on the gathered executing tokens only when at least this many tokens of the forward
# skip it; with fewer it runs on every token and the skipping tokens' rows are masked off (the same
# result, no index ops). Measured in vLLM on a 2-core AVX-512 BF16 CPU, SmolLM2-135M in bf16: a
# gather + scatter costs ~15 us, one row ~13-15 us of the MLP (95 us for 1 row, 173 for 8, 483
# for 32) but only ~2 us of o_proj (28 us for 8 rows, 42 for 16).
GATHER_MIN_SKIPS = {"attn": 16, "mlp": 2}
# Up to this many tokens in a forward, the routers' decisions are read to the host as margins and
# counted there (one read, no comparison or sum ops: a decode step pays ~10 us per small op here)
HOST_DECIDE_MAX_TOKENS = 64


def _router_config(hf_config) -> SkipGPTConfig:
    entry = getattr(hf_config, "skipgpt", None)
    if not isinstance(entry, dict) or "router_config" not in entry:
        raise SkipGPTError(
            "config.json has no skipgpt.router_config: prepare the folder with `skipgpt serve`"
        )
    return SkipGPTConfig.from_dict(entry["router_config"])


def _threshold(hf_config) -> float:
    override = getattr(hf_config, "skipgpt_threshold", None)
    value = override if override is not None else hf_config.skipgpt.get("threshold", 0.5)
    return SkipGPTConfig(threshold=value).threshold


def _dense_tokens(hf_config) -> tuple[int, int] | None:
    """The dense window: ``--hf-overrides {"skipgpt_dense_tokens": [lo, hi] | null}`` (``skipgpt serve
    --dense-tokens``), else the window ``skipgpt serve-tune`` measured for the served θ (config.json
    ``skipgpt.tuned_windows``), else ``DENSE_TOKENS``."""
    if hasattr(hf_config, "skipgpt_dense_tokens"):
        return checked_window(hf_config.skipgpt_dense_tokens, "skipgpt_dense_tokens")
    entry = getattr(hf_config, "skipgpt", None)
    return served_window(entry, _threshold(hf_config)) if entry else DENSE_TOKENS


@dataclass
class ServeRoutingState:
    """What all routed layers of one served model share.

    ``trace`` (when not None) collects, per forward, the input positions and every (layer, module)
    execute mask (N,) on the CPU: tests compare them with skipgpt's own decisions. The counters add
    up over the server's life; ``stats()`` turns them into sparsity and FLOPs.
    """

    threshold: float
    num_layers: int
    modules: tuple[str, ...]
    cost: CostModel
    routing: bool = True  # False: vLLM's own Llama layers on the same weights (the dense model)
    dense_tokens: tuple[int, int] | None = DENSE_TOKENS  # forwards of lo..hi tokens run dense
    dense_forwards: int = 0  # forwards that the window ran dense (counted in tokens, nothing skipped)
    stats_file: str | None = None
    trace: list[dict] | None = None
    forwards: int = 0
    tokens: int = 0
    logits_tokens: int = 0
    context_sum: float = 0.0  # sum over computed tokens of (position + 1)
    skipped: dict[str, list[int]] = field(default_factory=dict)
    skipped_context: list[float] = field(default_factory=list)  # per layer, attention skips only
    kv_only: int = 0  # (forward, layer) pairs whose attention was a K/V write alone (no token executed it)
    gather_min_skips: dict[str, int] = field(default_factory=lambda: dict(GATHER_MIN_SKIPS))
    _forward_context: float = 0.0  # the current forward's share of context_sum
    _positions: torch.Tensor | None = None
    _partial_attn: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, execute (N,))
    _current: dict | None = None
    _last_write: float = 0.0
    # ``serving.tune``: when set, forwards alternate routed (every forward, no window) and dense,
    # and each one's seconds are appended to ``ab_seconds[(routed, tokens)]``
    ab_seconds: dict[tuple[bool, int], list[float]] | None = None
    _ab_routed_next: bool = True

    def __post_init__(self) -> None:
        self.skipped = {m: [0] * self.num_layers for m in self.modules}
        self.skipped_context = [0.0] * self.num_layers

    def routes(self, tokens: int) -> bool:
        """Whether a forward of ``tokens`` tokens is routed (outside the dense window)."""
        window = self.dense_tokens
        return window is None or not window[0] <= tokens <= window[1]

    def begin(self, positions: torch.Tensor) -> None:
        self.forwards += 1
        self.tokens += positions.numel()
        self._forward_context = float(positions.sum()) + positions.numel()
        self.context_sum += self._forward_context
        self._positions = positions
        self._current = (
            {"positions": positions.cpu().clone(), "execute": {}} if self.trace is not None else None
        )

    def record(self, layer: int, module: str, execute: torch.Tensor | None, n_exec: int, n: int) -> None:
        """``n_exec`` of the forward's ``n`` tokens execute ``module`` of ``layer``; ``execute``: the
        (N,) mask, None when all or none execute. No tensor op: the context that partly skipped
        attentions save is summed once per forward, in ``end``."""
        self.skipped[module][layer] += n - n_exec
        if module == "attn" and n_exec == 0:
            self.skipped_context[layer] += self._forward_context
        elif module == "attn" and n_exec < n:
            self._partial_attn.append((layer, execute))
        if self._current is not None:
            self._current["execute"][(layer, module)] = (
                execute.cpu() if execute is not None else torch.full((n,), n_exec == n)
            )

    def end(self) -> None:
        if self._partial_attn:  # sum of (position + 1) over the skipping tokens, per layer
            skips = ~torch.stack([mask for _, mask in self._partial_attn])
            context = (skips.to(torch.float64) @ (self._positions.to(torch.float64) + 1)).tolist()
            for (layer, _), c in zip(self._partial_attn, context, strict=True):
                self.skipped_context[layer] += c
            self._partial_attn.clear()
        if self._current is not None:
            self.trace.append(self._current)
            self._current = None
        if self.stats_file and time.monotonic() - self._last_write >= STATS_INTERVAL_S:
            self.write_stats()

    def stats(self) -> dict:
        c = self.cost
        per_key = 4 * c.heads * c.head_dim  # attention FLOPs per (query, key)
        dense = self.tokens * c.layers * (c.q_o + c.k_v + c.mlp) + c.layers * per_key * self.context_sum
        dense += self.logits_tokens * c.lm_head
        skipped = 0.0
        for i in range(self.num_layers):
            # net of the substitutes that skipping tokens run (0 without them)
            if "attn" in self.skipped:
                skipped += self.skipped["attn"][i] * (c.q_o - c.substitute("attn"))
                skipped += per_key * self.skipped_context[i]
            if "mlp" in self.skipped:
                skipped += self.skipped["mlp"][i] * (c.mlp - c.substitute("mlp"))
        decisions = self.tokens * self.num_layers * len(self.modules)
        return {
            "pid": os.getpid(),
            "threshold": self.threshold,
            "forwards": self.forwards,
            "tokens": self.tokens,
            "logits_tokens": self.logits_tokens,
            "decisions": decisions,
            "skipped_decisions": sum(sum(v) for v in self.skipped.values()),
            "attention_kv_only": self.kv_only,
            "dense_tokens": list(self.dense_tokens) if self.dense_tokens else None,
            "dense_forwards": self.dense_forwards,
            "skipped": {m: list(v) for m, v in self.skipped.items()},  # a copy: counters move on
            # parameters of one module of one layer (FLOPs / 2), for a parameter-weighted sparsity
            "module_params": {"attn": (c.q_o + c.k_v) // 2, "mlp": c.mlp // 2},
            "dense_flops": dense,
            "skipped_flops": skipped,
        }

    def write_stats(self) -> None:
        self._last_write = time.monotonic()
        path = Path(self.stats_file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.stats()) + "\n")
        os.replace(tmp, path)


def _substitute_fn(sub: Substitute):
    """``sub.forward`` as one function of its tensors, without the three module calls (which a
    decode step on a CPU pays per layer)."""
    down, up, bias = sub.down.weight, sub.up.weight, sub.up.bias
    act = None if isinstance(sub.act, nn.Identity) else sub.act

    def forward(normed: torch.Tensor) -> torch.Tensor:
        h = F.linear(normed.to(down.dtype), down)
        return F.linear(h if act is None else act(h), up, bias).to(normed.dtype)

    return forward


class RoutedLayerMixin:
    """The routing of a vLLM decoder layer with Llama's parts (``self_attn.{qkv_proj, rotary_emb,
    attn, o_proj}``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``): routers
    ``routers.{attn,mlp}`` (float32, skipgpt's ``Router``), the K/V-only projection and the
    substitutes. A model's routed layer is this mixin before vLLM's layer class, whose
    ``__init__`` it calls and then ``_init_routing``."""

    def _init_routing(self, hf_config, prefix: str) -> None:
        rc = _router_config(hf_config)
        self.layer_idx = extract_layer_index(prefix)
        self.mlp_reads_block_input = rc.mlp_router_input == "block_input"
        self.routers = nn.ModuleDict(
            {m: Router.from_config(hf_config.hidden_size, rc) for m in rc.modules}
        ).to(torch.float32)
        self._names = tuple(self.routers)
        shared = self.mlp_reads_block_input or len(self.routers) == 1
        # frozen: a server's routers do not change after loading (``_load_routers`` refreshes)
        self._fused = (
            FusedRouters(list(self.routers.values()), frozen=True) if shared and self.routers else None
        )
        self._kv_only_ok: bool | None = None  # _kv_only_possible(), read once
        # the k/v rows of qkv_proj (filled at load): what a step where no token executes the
        # attention computes, besides the norm and the keys' rotary
        attn = self.self_attn
        self.kv_only = (
            ReplicatedLinear(
                hf_config.hidden_size,
                2 * attn.kv_size,
                bias=getattr(attn.qkv_proj, "bias", None) is not None,
                params_dtype=attn.qkv_proj.weight.dtype,
                prefix=f"{prefix}.kv_only",
            )
            if "attn" in rc.modules
            else None
        )
        rank = rc.rank_for(hf_config.hidden_size)
        self.substitutes = nn.ModuleDict(
            {m: Substitute(hf_config.hidden_size, rank, rc.substitute_activation) for m in rc.substituted}
        ).to(torch.float32)
        # module -> the substitute's forward over its (loaded in place) tensors: no module calls
        self._substitute_fns = {m: _substitute_fn(sub) for m, sub in self.substitutes.items()}

    def _decide(
        self, hidden: torch.Tensor, modules: Iterable[str], threshold: float
    ) -> dict[str, tuple[torch.Tensor | None, int]]:
        """For hidden states (N, d), each of ``modules`` -> (its execute mask (N,), None when all
        or none of the tokens execute it; how many do). One host read for all modules. Few tokens
        (decode) are decided on the host from the routers' margins, so that a layer whose
        decisions are all alike makes no bool tensor; a single token reads Python bools from
        matrix-vector products (``FusedRouters.execute_one``)."""
        N = hidden.shape[0]
        if self._fused is not None and N == 1:
            flags = self._fused.execute_one(hidden, threshold)
            return {m: (None, int(f)) for m, f in zip(self._names, flags, strict=True) if m in modules}
        if self._fused is not None and 0.0 < threshold < 1.0 and N <= HOST_DECIDE_MAX_TOKENS:
            margins = self._fused.margins(hidden, threshold)  # (N, R): execute iff >= 0
            counts = [sum(v >= 0 for v in router) for router in zip(*margins.tolist(), strict=True)]
            execute = None if all(c in (0, N) for c in counts) else margins >= 0
            names = self._names
        elif self._fused is not None:
            execute, names = self._fused.execute(hidden, threshold), self._names  # (N, R)
            counts = execute.sum(0).tolist()
        else:
            names = [m for m in self._names if m in modules]
            execute = torch.stack(
                [self.routers[m].execute_probability(hidden) >= threshold for m in names], dim=-1
            )
            counts = execute.sum(0).tolist()
        return {
            m: (execute[:, i] if 0 < counts[i] < N else None, counts[i])
            for i, m in enumerate(names)
            if m in modules
        }

    def _attention(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """positions (N,), normed block input h (N, d) -> attention output before ``o_proj``
        (N, H*hd); vLLM's op writes every token's K/V into the paged cache."""
        attn = self.self_attn
        qkv, _ = attn.qkv_proj(h)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        return attn.attn(q, k, v)

    def _kv_only_possible(self) -> bool:
        """Whether this layer's K/V can be written without the attention op: a backend whose
        forward does not write the cache itself, and a cache of this layer's own (read once)."""
        if self._kv_only_ok is None:
            op = self.self_attn.attn
            self._kv_only_ok = (
                self.kv_only is not None
                and not op.attn_backend.forward_includes_kv_cache_update
                and op.kv_sharing_target_layer_name is None
            )
        return self._kv_only_ok

    def _write_kv_only(self, positions: torch.Tensor, h: torch.Tensor) -> None:
        """Only the K/V of every token (N,) into the paged cache: no query, attention or o_proj."""
        attn = self.self_attn
        kv, _ = self.kv_only(h)
        k, v = kv.split([attn.kv_size, attn.kv_size], dim=-1)
        k, _ = attn.rotary_emb(positions, k)  # rotary of the keys alone (key=None)
        heads, size = attn.attn.num_kv_heads, attn.attn.head_size
        unified_kv_cache_update(k.reshape(-1, heads, size), v.reshape(-1, heads, size), attn.attn.layer_name)

    def _attn_out(self, o: torch.Tensor) -> torch.Tensor:
        return self.self_attn.o_proj(o)[0]

    def _merge(self, module: str, x, execute, n: int, inputs, fn, normed, state) -> torch.Tensor:
        """The block state x (N, d) after ``module``: + ``fn(inputs)`` on the ``n`` rows that
        execute it (``execute`` (N,) bool, None when n is 0 or N), + its substitute of ``normed``
        (N, d), the module's normed input, on the rows that skip it (when it has one).

        Few skipping rows (``state.gather_min_skips``): ``fn`` runs on every row and the skipping
        rows take the substitute's output or nothing instead (``torch.where``). More: only the
        executing rows are gathered and run, the substitute runs on the skipping rows, and one
        ``index_add`` scatters both back."""
        N = x.shape[0]
        sub = self._substitute_fns.get(module)
        if n == N:
            return x + fn(inputs)
        if n == 0:
            return x if sub is None else x + sub(normed)
        if N - n < state.gather_min_skips[module]:
            keep, y = execute.unsqueeze(1), fn(inputs)
            return torch.where(keep, x + y, x) if sub is None else x + torch.where(keep, y, sub(normed))
        order = torch.argsort(execute, descending=True, stable=True)  # executing rows first
        y = fn(inputs.index_select(0, order[:n]))
        if sub is None:
            return x.index_add(0, order[:n], y)
        return x.index_add(0, order, torch.cat([y, sub(normed.index_select(0, order[n:]))]))

    def routed(self, positions: torch.Tensor, x: torch.Tensor, state: ServeRoutingState) -> torch.Tensor:
        """positions (N,), block input x (N, d) -> block output (N, d)."""
        N = x.shape[0]
        decided = self._decide(
            x, ("attn", "mlp") if self.mlp_reads_block_input else ("attn",), state.threshold
        )
        h = self.input_layernorm(x)
        if "attn" not in decided:
            x = x + self._attn_out(self._attention(positions, h))
        else:
            execute, n = decided["attn"]
            if n == 0 and self._kv_only_possible():
                self._write_kv_only(positions, h)
                state.kv_only += 1
                o = None
            else:  # every token's K/V go into the cache, even when no token executes the attention
                o = self._attention(positions, h)
            x = self._merge("attn", x, execute, n, o, self._attn_out, h, state)
            state.record(self.layer_idx, "attn", execute, n, N)
        if "mlp" not in self.routers:
            return x + self.mlp(self.post_attention_layernorm(x))
        if "mlp" not in decided:  # the MLP router reads the post-attention stream
            decided.update(self._decide(x, ("mlp",), state.threshold))
        execute, n = decided["mlp"]
        hn = self.post_attention_layernorm(x) if n or "mlp" in self._substitute_fns else None
        x = self._merge("mlp", x, execute, n, hn, self.mlp, hn, state)
        state.record(self.layer_idx, "mlp", execute, n, N)
        return x

    def forward(self, positions, hidden_states, residual):
        x = hidden_states if residual is None else hidden_states + residual
        return self.routed(positions, x, self.skipgpt_state), None


class SkipGPTLlamaDecoderLayer(RoutedLayerMixin, LlamaDecoderLayer):
    """vLLM's Llama decoder layer, routed."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        prefix: str = "",
        config=None,
        attn_layer_type: type[nn.Module] = LlamaAttention,
    ) -> None:
        super().__init__(
            vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=attn_layer_type
        )
        self._init_routing(config or vllm_config.model_config.hf_config, prefix)


class RoutedModelMixin:
    """The forward of a vLLM decoder-only model over routed layers: the residual stream stays one
    tensor (no fused add+norm); forwards outside the routing (``routing`` off, the dense window)
    run ``dense_layer_type``'s own forward. ``_init_routing_state`` after vLLM's ``__init__``."""

    dense_layer_type: type[nn.Module]

    def _init_routing_state(self, vllm_config: VllmConfig) -> None:
        if get_pp_group().world_size > 1:
            raise SkipGPTError("the routed vLLM model does not support pipeline parallelism")
        hf_config = vllm_config.model_config.hf_config
        rc = _router_config(hf_config)
        self.skipgpt_state = ServeRoutingState(
            threshold=_threshold(hf_config),
            dense_tokens=_dense_tokens(hf_config),
            num_layers=hf_config.num_hidden_layers,
            modules=tuple(rc.modules),
            cost=CostModel.from_config(
                hf_config,
                router_hidden=rc.router_hidden,
                substitute_ranks={m: rc.rank_for(hf_config.hidden_size) for m in rc.substituted},
            ),
            stats_file=os.environ.get(STATS_ENV) or None,
        )
        for layer in self.layers[self.start_layer : self.end_layer]:
            object.__setattr__(layer, "skipgpt_state", self.skipgpt_state)  # shared, not a submodule

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """input_ids/positions (N,) -> final-normed hidden states (N, d)."""
        state = self.skipgpt_state
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        if not state.routing:  # the dense model, no statistics
            return self._dense(positions, x)
        if state.ab_seconds is not None:
            return self._ab_forward(positions, x, state)
        state.begin(positions)
        if state.routes(positions.numel()):
            x = self._routed(positions, x, state)
        else:  # in the dense window: its tokens count, none skipped
            state.dense_forwards += 1
            x = self._dense(positions, x)
        state.end()
        return x

    def _routed(self, positions: torch.Tensor, x: torch.Tensor, state: ServeRoutingState) -> torch.Tensor:
        for layer in self.layers[self.start_layer : self.end_layer]:
            x = layer.routed(positions, x, state)
        return self.norm(x)

    def _ab_forward(self, positions: torch.Tensor, x: torch.Tensor, state: ServeRoutingState) -> torch.Tensor:
        """``serving.tune``: this forward routed (every forward, counted) or dense, alternately;
        its seconds go to ``state.ab_seconds[(routed, N)]``."""
        routed, state._ab_routed_next = state._ab_routed_next, not state._ab_routed_next
        start = time.perf_counter()
        if routed:
            state.begin(positions)
            x = self._routed(positions, x, state)
            state.end()
        else:
            x = self._dense(positions, x)
        state.ab_seconds.setdefault((routed, positions.numel()), []).append(time.perf_counter() - start)
        return x

    def _dense(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The dense model as vLLM runs it (vLLM's own layers, fused residual adds)."""
        residual = None
        for layer in self.layers[self.start_layer : self.end_layer]:
            x, residual = self.dense_layer_type.forward(layer, positions, x, residual)
        return self.norm(x, residual)[0]


@ignore_torch_compile
class SkipGPTLlamaModel(RoutedModelMixin, LlamaModel):
    """LlamaModel over routed layers."""

    dense_layer_type = LlamaDecoderLayer

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=SkipGPTLlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self._init_routing_state(vllm_config)


class RoutedCausalLMMixin:
    """The causal LM around a ``RoutedModelMixin`` model: its routing state, the logits count, and
    the weights vLLM does not know (routers, substitutes, the K/V-only projection) at load.
    ``self._model_path`` (the prepared folder) is set before vLLM's ``__init__``."""

    @property
    def skipgpt_state(self) -> ServeRoutingState:
        return self.model.skipgpt_state

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        self.model.skipgpt_state.logits_tokens += hidden_states.shape[0]
        return super().compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        return loaded | self._load_routers() | self._fill_kv_only()

    def _fill_kv_only(self) -> set[str]:
        """Copy the k/v rows of each loaded ``qkv_proj`` into the layer's ``kv_only`` (before vLLM
        packs the weights for its GEMM kernels); returns the parameter names it filled."""
        filled = set()
        with torch.no_grad():
            for layer in self.model.layers[self.model.start_layer : self.model.end_layer]:
                if layer.kv_only is None:
                    continue
                qkv, q_size = layer.self_attn.qkv_proj, layer.self_attn.q_size
                for name, p in layer.kv_only.named_parameters():
                    p.copy_(getattr(qkv, name)[q_size:])
                    filled.add(f"model.layers.{layer.layer_idx}.kv_only.{name}")
        return filled

    def _load_routers(self) -> set[str]:
        """Copy ``skipgpt/routers.safetensors`` (``layers.{i}.{module}.net.{j}.{weight|bias}``, and
        ``substitutes.layers.{i}.{module}.{down|up}...`` when skipped tokens run substitutes) into
        the routers and substitutes; returns the parameter names it loaded. Refuses a file that
        does not fit."""
        entry = self.config.skipgpt
        path = Path(self._model_path) / entry.get("routers", f"{ROUTERS_SUBDIR}/routers.safetensors")
        if not path.exists():
            raise SkipGPTError(f"router file {path} not found; prepare the folder with `skipgpt serve`")
        tensors = load_file(str(path))
        own = {}
        for layer in self.model.layers[self.model.start_layer : self.model.end_layer]:
            for name, p in layer.routers.named_parameters():
                own[f"layers.{layer.layer_idx}.{name}"] = (
                    f"model.layers.{layer.layer_idx}.routers.{name}",
                    p,
                )
            for name, p in layer.substitutes.named_parameters():
                own[f"{SUBSTITUTE_PREFIX}layers.{layer.layer_idx}.{name}"] = (
                    f"model.layers.{layer.layer_idx}.substitutes.{name}",
                    p,
                )
        missing = sorted(set(own) - set(tensors))
        bad = [k for k in own if k in tensors and tensors[k].shape != own[k][1].shape]
        if missing or bad:
            raise SkipGPTError(
                f"router file {path} does not fit this model: {len(missing)} missing, {len(bad)} of another shape"
                + (f", e.g. {(missing or bad)[0]}" if missing or bad else "")
            )
        with torch.no_grad():
            for key, (_, p) in own.items():
                p.copy_(tensors[key])
        for layer in self.model.layers[self.model.start_layer : self.model.end_layer]:
            if layer._fused is not None:
                layer._fused.refresh()
        return {full for full, _ in own.values()}


class SkipGPTLlamaForCausalLM(RoutedCausalLMMixin, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM whose decoder layers are routed (``architectures`` of a prepared folder)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type=SkipGPTLlamaDecoderLayer):
        self._model_path = vllm_config.model_config.model
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=SkipGPTLlamaDecoderLayer):
        return SkipGPTLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
