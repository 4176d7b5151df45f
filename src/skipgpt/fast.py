"""Inference execution that really skips work (gather the executing tokens, run, scatter back).

Every function here has a reference twin in ``layer.py`` (module on all tokens, output times
the 0/1 gate) and is tested against it (``tests/test_fast.py``).

Attention (``fast_attn_residual``), for a block input ``h`` (B, T, d) and an execute mask:

* keys/values for *every* token (``k_proj``, ``v_proj`` or the k/v rows of a fused
  ``qkv_proj``, optional per-head or full-width ``k_norm``, rotary), written
  into the HF cache with ``cache.update`` exactly as the stock attention does (the layer
  argument's name, ``cache`` or ``past_key_values`` by transformers version, is read from the
  decoder layer's signature at wrap time: ``RoutedDecoderLayer.kv_cache``), so a
  token that skips still leaves its K/V for the tokens that attend to it later;
* queries (``q_proj``, optional ``q_norm``, rotary), attention and ``o_proj`` only for the
  executing tokens, whose outputs are scatter-added into the residual stream.

Masking follows what the model passes its layers. A 4D mask (B or 1, 1, T, KV) (boolean for
sdpa, additive float for eager; it already holds causality, padding and sliding windows) is
read row by row for the executing queries; ``None`` means what it means to the stock sdpa
call: causal (upper-left, keys cropped to T) when T > 1, all keys when T == 1.

Prefill packs the executing queries of each sequence into (B, Tq) slots, Tq = the largest
count, and runs SDPA over query chunks whose keys stop at the chunk's last position, so the
upper triangle that the dense causal kernel never computes is (mostly) not computed here
either. Decode (T == 1) runs SDPA per run of consecutive executing sequences on views of the
cache (no copy of K/V); a step where no sequence executes costs only the K/V projections.

Batch-1 decode is all or nothing: an executing token runs the model's own attention/MLP, a
skipping one only its K/V projections. Its two decisions per layer reach the host as Python
bools in one read (``routing.LearnedPolicy.decide_layer``), so the branch and the
statistics cost no further tensor operations. Batched decode where over a quarter of the sequences execute runs the
module on every row and drops the skipping rows' outputs (``_decode_runs_all_rows``: small-M
GEMMs cost about the same for n rows as for B); a module that no sequence executes costs nothing
(attention: its K/V projections only).

The decisions themselves are cheap on purpose: at inference a layer's attention and MLP
routers, which both read the block input by default, run as one (``router.FusedRouters``: two
GEMM calls per layer instead of four), before the attention.

Where decisions reach the host. On a CPU a read of a device value costs nothing, so the code
above reads where it needs to (``nonzero`` per module, the runs of a decode step, the stats).
On a GPU every read stops the asynchronous kernel queue, so tensors on any other device take
the *device path* (``sync_policy``; ``SKIPGPT_SYNC_POLICY=host|device|auto`` forces one):

* statistics accumulate on the device and are read once when asked (``routing.RoutingStats``);
* a layer's two execute masks are read to the host in one copy (``plan_decisions`` ->
  ``HostPlan``: counts, the executing sequences of a decode step, chunk limits of a prefill),
  and the gather indices are built on the device from the known count (a stable sort, no
  ``nonzero``);
* batch-1 decode with fused routers reads its two Python bools once per layer, as on a CPU.

Host reads per forward on the device path (counted with ``skipgpt.eval.syncs``): one per layer
(two when the MLP router reads the attention output, which it decides after the attention),
plus one per forward for a prefill's causal-mask check; none from statistics. A module can
only be skipped by not launching it, so one read per layer is what skipping needs; the
sync-free alternative is the masked execution (every module on every token, times the gate).

A module with a substitute (``substitutes.py``) runs it on its real skipping tokens only
(``fast_substitute_residual``: gather, run, scatter, after the module's own kernel); an
attention substitute replaces the skipping token's attention output only: its K/V are written
as without one.

Padding tokens (``RoutedDecoderLayer.token_mask``) never execute here: no real token reads their
outputs, so their logits are garbage, as they already are in the dense model.

Attention variants the kernel does not implement (softcapping, attention sinks, partial
rotary, flash/flex attention, ``output_attentions``, an unknown attention class) fall back to
the reference computation with a one-time warning: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters import ATTENTION_PARTS, AttentionParts

__all__ = [
    "AttentionParts",
    "ATTENTION_PARTS",
    "register_attention",
    "fast_attn_residual",
    "fast_mlp_residual",
    "fast_substitute_residual",
    "fast_attention_supported",
    "HostPlan",
    "plan_decisions",
    "reads_are_free",
    "sync_policy",
]


# Mask conventions the kernel understands (what create_causal_mask builds for these).
_FAST_IMPLEMENTATIONS = ("sdpa", "eager")

_MAX_DECODE_RUNS = 4  # above this many runs of executing sequences, gather K/V instead of looping
_MIN_CHUNK = 64  # prefill query chunk: at least this many packed queries ...
_MAX_CHUNKS = 8  # ... and at most this many chunks

_warned: set[str] = set()


def register_attention(class_name: str, parts: AttentionParts) -> None:
    """Declare that attention modules of ``class_name`` follow the Llama recipe with these parts
    (kept for callers; ``adapters.register_architecture`` registers a whole family at once)."""
    ATTENTION_PARTS[class_name] = parts


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"skipgpt fast path: {reason}; using the reference (compute-all, gated) attention "
            "for it: correct, but skipped attention saves no time",
            stacklevel=3,
        )


def _unsupported(attn, kwargs) -> str | None:
    """Why the fast kernel cannot run this attention call, or None when it can."""
    name = type(attn).__name__
    if name not in ATTENTION_PARTS:
        return f"attention class {name} is not registered (skipgpt.adapters.register_architecture)"
    config = getattr(attn, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _FAST_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} (fast kernel supports {list(_FAST_IMPLEMENTATIONS)})"
    for flag in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, flag, None) is not None or getattr(attn, flag, None) is not None:
            return "attention logit softcapping"
    if getattr(attn, "sinks", None) is not None:
        return "attention sinks"
    if not getattr(attn, "is_causal", True):
        return "non-causal attention"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    pe = kwargs.get("position_embeddings")
    if not (isinstance(pe, tuple | list) and len(pe) == 2):
        return "no (cos, sin) position_embeddings"
    if pe[0].shape[-1] != attn.head_dim:
        return "partial rotary embeddings"
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
        return f"attention mask of type {type(mask).__name__} / shape {getattr(mask, 'shape', None)}"
    if mask is None and impl == "eager":
        return "eager attention without a mask"
    return None


def fast_attention_supported(layer, **kwargs) -> str | None:
    """None when ``layer``'s attention runs on the fast kernel with these kwargs, else why not."""
    return _unsupported(layer.part("attn"), kwargs)


# -- where decisions are read on the host ------------------------------------------------------------
_POLICIES = ("auto", "host", "device")
_policy = os.environ.get("SKIPGPT_SYNC_POLICY", "auto")
if _policy not in _POLICIES:
    raise ValueError(f"SKIPGPT_SYNC_POLICY={_policy!r}; accepted: {list(_POLICIES)}")


def reads_are_free(t: torch.Tensor) -> bool:
    """Whether the fast path may read ``t``'s values on the host where it needs them: a CPU
    tensor under the ``auto`` policy (or any tensor under ``host``); False takes the device path."""
    if _policy == "auto":
        return t.device.type == "cpu"
    return _policy == "host"


@contextlib.contextmanager
def sync_policy(policy: str):
    """Context: ``"auto"`` (host reads on a CPU, device path elsewhere), ``"host"`` or ``"device"``
    (e.g. to run and count the GPU's path on a CPU)."""
    global _policy
    if policy not in _POLICIES:
        raise ValueError(f"sync policy {policy!r}; accepted: {list(_POLICIES)}")
    old, _policy = _policy, policy
    try:
        yield
    finally:
        _policy = old


@dataclass
class HostPlan:
    """One module's execute decisions, with what the host must know of them (device path).

    ``mask`` (B, T) bool on the device, padding removed; ``host`` the same on the CPU (read
    once per layer for both modules); ``n`` executing tokens; ``per_row`` (B) executing tokens
    per sequence; ``rows`` (T == 1) the executing sequences. ``skip``: for a module with a
    substitute, the same of its real *skipping* tokens (read in the same host copy).
    """

    mask: torch.Tensor
    host: torch.Tensor
    n: int
    per_row: list[int]
    rows: list[int] | None = None
    skip: HostPlan | None = None
    _idx: torch.Tensor | None = field(default=None, repr=False)

    def indices(self) -> torch.Tensor:
        """Flat indices (n,) of the executing tokens, ascending, on the device, without a host
        read: a stable sort puts the executing ones first and the count is known."""
        if self._idx is None:
            flat = self.mask.reshape(-1)
            if self.n == flat.numel():
                self._idx = torch.arange(self.n, device=flat.device)
            else:
                order = torch.sort(flat.to(torch.int32), descending=True, stable=True).indices
                self._idx = order[: self.n]
        return self._idx


def plan_decisions(layer, masks: dict[str, torch.Tensor]) -> dict[str, HostPlan]:
    """(B, T) execute masks of some modules of one layer -> their ``HostPlan``, with ONE host read.

    Padding tokens are removed first (``_effective_execute``). A module with a substitute also
    gets the plan of its real skipping tokens (``HostPlan.skip``), from the same read.
    """
    masks = {m: _effective_execute(layer, e) for m, e in masks.items()}
    skips = {m: _real_skipping(layer, e) for m, e in masks.items() if m in layer.substitutes}
    stacked = list(masks.values()) + list(skips.values())
    host = torch.stack(stacked, -1).cpu()  # (B, T, R): the layer's one read
    per_row = host.sum(1).tolist()  # (B, R), from the host copy

    def plan(r: int, mask: torch.Tensor) -> HostPlan:
        counts = [row[r] for row in per_row]
        rows = [b for b, c in enumerate(counts) if c] if mask.shape[1] == 1 else None
        return HostPlan(mask, host[..., r], sum(counts), counts, rows)

    plans = {m: plan(r, mask) for r, (m, mask) in enumerate(masks.items())}
    for r, (m, mask) in enumerate(skips.items(), start=len(masks)):
        plans[m].skip = plan(r, mask)
    return plans


# -- helpers ---------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same arithmetic as HF's apply_rotary_pos_emb (cos/sin already broadcastable to x)."""
    return (x * cos) + (_rotate_half(x) * sin)


def _effective_execute(layer, execute: torch.Tensor) -> torch.Tensor:
    """Padding tokens never execute (their outputs are read by nothing but their own logits)."""
    mask = layer.token_mask
    if mask is not None and mask.shape == execute.shape:
        return execute & mask.to(execute.device)
    return execute


def _real_skipping(layer, execute: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the real (non-padding) tokens that do not execute."""
    skip = ~execute
    mask = layer.token_mask
    if mask is not None and mask.shape == execute.shape:
        return skip & mask.to(execute.device)
    return skip


_causal_cache: list[tuple[weakref.ref, int, bool]] = []  # the last few masks seen


def _is_causal_mask(mask: torch.Tensor, past: int) -> bool:
    """True if no query row j of a 4D mask allows a key after ``past + j`` (lower-right causal).

    Cached per mask object: the model passes the same mask to every layer of a forward.
    """
    for ref, seen_past, result in _causal_cache:
        if ref() is mask and seen_past == past:
            return result
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    result = not bool(allowed.triu(past + 1).any())
    _causal_cache.append((weakref.ref(mask), past, result))
    del _causal_cache[:-4]
    return result


def _decode_runs_all_rows(shape: tuple[int, int, int], n: int) -> bool:
    """Batched decode (T == 1) where more than a quarter of the sequences execute: run the
    module on all B rows and drop the outputs of the skipping ones.

    A decode step multiplies (B, d) rows by whole weight matrices; for small B that costs about
    the same for n rows as for B (seen on a 2-core EPYC, a 576x1536 GEMM: 88 us for 1 row,
    165 us for 2, 269 us for 5, 227 us for 8), so gathering n < B rows saves little or nothing
    while its index_select / index_add / per-run attention calls cost some.
    """
    B, T, _ = shape
    return T == 1 and B > 1 and 4 * n > B


# -- MLP -------------------------------------------------------------------------------------------
def fast_mlp_residual(layer, hidden_states: torch.Tensor, execute: torch.Tensor | bool) -> torch.Tensor:
    """hidden_states (B, T, d), execute (B, T) bool -> hidden_states + MLP branch on executing tokens.

    A single token's decision may come as a Python bool (already read on the host); on the
    device path it comes as a ``HostPlan`` (read with the layer's other decision)."""
    if isinstance(execute, bool) or (isinstance(execute, torch.Tensor) and execute.numel() == 1):
        # batch-1 decode: all or nothing, no gather
        return hidden_states + layer.mlp_branch(hidden_states) if bool(execute) else hidden_states
    if isinstance(execute, HostPlan):
        plan, execute, idx, n = execute, execute.mask, None, execute.n
    else:
        execute = _effective_execute(layer, execute)
        idx = execute.reshape(-1).nonzero().squeeze(-1)
        plan, n = None, idx.numel()
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    if n == 0:
        return hidden_states
    if n == flat.shape[0]:
        return hidden_states + layer.mlp_branch(hidden_states)
    if _decode_runs_all_rows(hidden_states.shape, n):
        return hidden_states + execute.unsqueeze(-1).to(hidden_states.dtype) * layer.mlp_branch(hidden_states)
    idx = plan.indices() if idx is None else idx
    out = layer.mlp_branch(flat.index_select(0, idx).unsqueeze(0)).squeeze(0)
    return flat.index_add(0, idx, out.to(flat.dtype)).view_as(hidden_states)


# -- substitutes -----------------------------------------------------------------------------------
def fast_substitute_residual(
    layer,
    module: str,
    hidden_states: torch.Tensor,
    execute: torch.Tensor | bool | HostPlan,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out`` (B, T, d) + ``module``'s substitute of hidden_states (B, T, d) on the real tokens
    that do not execute it (gather, run, scatter); padding tokens run nothing.

    ``execute`` as the module's kernel got it: a single token's Python bool, a (B, T) bool mask,
    or a ``HostPlan`` whose ``skip`` plan holds the skipping tokens (device path, no host read)."""
    if isinstance(execute, bool) or (isinstance(execute, torch.Tensor) and execute.numel() == 1):
        return out if bool(execute) else out + layer.substitute_branch(module, hidden_states)
    if isinstance(execute, HostPlan):
        skip = execute.skip
        idx, n = None, skip.n
    else:
        idx = _real_skipping(layer, execute).reshape(-1).nonzero().squeeze(-1)
        n = idx.numel()
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    if n == 0:
        return out
    if n == flat.shape[0]:
        return out + layer.substitute_branch(module, hidden_states)
    idx = skip.indices() if idx is None else idx
    sub = layer.substitute_branch(module, flat.index_select(0, idx))
    return out.reshape(flat.shape).index_add(0, idx, sub.to(out.dtype)).view_as(out)


# -- attention -------------------------------------------------------------------------------------
def fast_attn_residual(
    layer, hidden_states: torch.Tensor, execute: torch.Tensor | bool, **kwargs
) -> torch.Tensor:
    """hidden_states (B, T, d), execute (B, T) bool -> hidden_states + attention branch on executing tokens.

    K/V of every token are computed and cached; queries, attention and the output projection
    only for executing tokens. ``kwargs`` are what the model passes its decoder layers. A
    single token's decision may come as a Python bool (already read on the host); on the device
    path the decisions come as a ``HostPlan``.
    """
    if execute is True:  # batch-1 decode, executing: the model's own attention, no checks needed
        return hidden_states + layer.attn_branch(hidden_states, **kwargs)
    attn = layer.part("attn")
    cache = layer.kv_cache(kwargs)  # raises if a cache is in use under a name we do not know
    reason = _unsupported(attn, kwargs)
    plan = execute if isinstance(execute, HostPlan) else None
    if reason is not None:
        _warn_once(reason)
        out = layer.attn_branch(hidden_states, **kwargs)
        if isinstance(execute, bool):
            return hidden_states + out if execute else hidden_states
        mask = execute if plan is None else plan.mask
        return hidden_states + mask.unsqueeze(-1).to(out.dtype) * out

    B, T, d = hidden_states.shape
    if B * T == 1 and plan is None:  # batch-1 decode: all or nothing
        if bool(execute):
            return hidden_states + layer.attn_branch(hidden_states, **kwargs)
        flat_idx, n = None, 0
    else:
        if plan is None:
            execute = _effective_execute(layer, execute)
            flat_idx = execute.reshape(-1).nonzero().squeeze(-1)
            n = flat_idx.numel()
        else:
            execute, n = plan.mask, plan.n
            flat_idx = plan.indices() if 0 < n < B * T and not _decode_runs_all_rows((B, T, d), n) else None
        if n == B * T:  # everyone executes: the model's own attention, exactly as the reference
            return hidden_states + layer.attn_branch(hidden_states, **kwargs)
        if _decode_runs_all_rows((B, T, d), n):
            out = layer.attn_branch(hidden_states, **kwargs)
            return hidden_states + execute.unsqueeze(-1).to(out.dtype) * out

    parts = ATTENTION_PARTS[type(attn).__name__]
    hd = attn.head_dim
    x = layer.norm("attn_pre_norm", hidden_states)
    cos, sin = kwargs["position_embeddings"]

    # keys / values of every token, into the cache
    k, v = _project_kv(attn, parts, x)
    k = _rope(k.view(B, T, -1, hd).transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
    v = v.view(B, T, -1, hd).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    if n == 0:
        return hidden_states

    # queries of executing tokens only: (n, H, hd)
    x_flat = x.reshape(B * T, d)
    q = _project_q(attn, parts, x_flat.index_select(0, flat_idx)).view(n, -1, hd)
    if parts.q_norm is not None and not parts.qk_norm_full_width:
        q = getattr(attn, parts.q_norm)(q)
    if T == 1 and cos.shape[0] == 1:  # decode: one position for everyone
        cos_q, sin_q = cos[0], sin[0]
    elif cos.shape[0] == 1:
        t_of = flat_idx % T
        cos_q, sin_q = cos[0].index_select(0, t_of), sin[0].index_select(0, t_of)
    else:
        cos_q = cos.expand(B, T, hd).reshape(B * T, hd).index_select(0, flat_idx)
        sin_q = sin.expand(B, T, hd).reshape(B * T, hd).index_select(0, flat_idx)
    q = _rope(q, cos_q.unsqueeze(1), sin_q.unsqueeze(1))

    mask = kwargs.get("attention_mask")
    if T == 1:
        rows = () if plan is None else (plan.rows,)  # the device path knows them already
        out = _decode_attention(attn, q, k, v, mask, flat_idx, *rows)
    else:
        out = _prefill_attention(attn, q, k, v, mask, execute, flat_idx, plan)
    out = getattr(attn, parts.o_proj)(out)
    out = layer.norm("attn_post_norm", out)
    flat = hidden_states.reshape(B * T, d)
    return flat.index_add(0, flat_idx, out.to(flat.dtype)).view_as(hidden_states)


def _fused_rows(attn, parts, which: str):
    """Weight and bias rows of ``which`` ('q' or 'kv') in a fused [q | k | v] projection (views)."""
    proj = getattr(attn, parts.qkv_proj)
    q_rows = attn.config.num_attention_heads * attn.head_dim
    rows = slice(0, q_rows) if which == "q" else slice(q_rows, None)
    return proj.weight[rows], None if proj.bias is None else proj.bias[rows]


def _project_kv(attn, parts, x):
    """k (after a full-width or per-head k_norm; before rotary) and v, flat (..., KVH*hd)."""
    if parts.qkv_proj is not None:
        kv = F.linear(x, *_fused_rows(attn, parts, "kv"))
        k, v = kv.split(kv.shape[-1] // 2, dim=-1)
    else:
        k, v = getattr(attn, parts.k_proj)(x), getattr(attn, parts.v_proj)(x)
    if parts.k_norm is not None:
        norm = getattr(attn, parts.k_norm)
        if parts.qk_norm_full_width:
            k = norm(k)
        else:
            k = norm(k.view(*k.shape[:-1], -1, attn.head_dim)).flatten(-2)
    return k, v


def _project_q(attn, parts, x):
    """q of the executing tokens, flat (n, H*hd); a full-width q_norm applied here."""
    q = (
        F.linear(x, *_fused_rows(attn, parts, "q"))
        if parts.qkv_proj is not None
        else getattr(attn, parts.q_proj)(x)
    )
    if parts.q_norm is not None and parts.qk_norm_full_width:
        q = getattr(attn, parts.q_norm)(q)
    return q


def _sdpa(attn, q, k, v, mask):
    """SDPA with the module's scaling; GQA without copying K/V."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)


def _decode_attention(attn, q, k, v, mask, idx, rows: list[int] | None = None) -> torch.Tensor:
    """One new token per sequence; q (n, H, hd) for the executing sequences ``idx`` -> (n, H*hd).

    Keys (B, KVH, KV, hd) of the cache are read through views, one SDPA per run of
    consecutive executing sequences (a step's runs are few), so no K/V is copied. ``rows``:
    ``idx`` as already read on the host (device path), else read here.
    """
    n, H, hd = q.shape
    kvh = k.shape[1]
    qg = q.view(n, kvh, H // kvh, hd)  # pack GQA: the query heads of one K/V head as query rows
    if mask is not None:
        mask = mask if mask.shape[0] > 1 else mask.expand(k.shape[0], *mask.shape[1:])
    rows = idx.tolist() if rows is None else rows
    runs: list[tuple[int, int, int]] = []  # (first sequence, end sequence, first row of q)
    for i, b in enumerate(rows):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1, runs[-1][2])
        else:
            runs.append((b, b + 1, i))
    if len(runs) > _MAX_DECODE_RUNS:
        m = None if mask is None else mask.index_select(0, idx)
        out = F.scaled_dot_product_attention(
            qg, k.index_select(0, idx), v.index_select(0, idx), attn_mask=m, scale=attn.scaling
        )
        return out.reshape(n, H * hd)
    outs = []
    for s, e, i in runs:
        m = None if mask is None else mask[s:e]
        outs.append(
            F.scaled_dot_product_attention(qg[i : i + e - s], k[s:e], v[s:e], attn_mask=m, scale=attn.scaling)
        )
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    return out.reshape(n, H * hd)


def _packed_positions(execute: torch.Tensor, flat_idx: torch.Tensor, tq: int):
    """Packing of the executing tokens ``flat_idx`` of execute (B, T) into (B, Tq) query slots:
    (sequence of each token (n,), its slot (n,), position of each slot (B, Tq)); B == 1: (None,
    None, positions (1, n))."""
    B, T = execute.shape
    t_of = flat_idx % T
    if B == 1:
        return None, None, t_of.unsqueeze(0)
    b_of = flat_idx // T
    rank = (execute.cumsum(1) - 1).reshape(-1).index_select(0, flat_idx)
    qpos = torch.zeros(B, tq, dtype=torch.long, device=execute.device)
    qpos[b_of, rank] = t_of
    # empty slots repeat their row's last query (never widen the key range)
    return b_of, rank, qpos.cummax(1).values


def _prefill_attention(attn, q, k, v, mask, execute, flat_idx, plan: HostPlan | None = None) -> torch.Tensor:
    """q (n, H, hd) of the executing tokens ``flat_idx`` of execute (B, T) -> (n, H*hd).

    With a ``plan`` (device path) the query count per sequence and the key range of each chunk
    come from its host copy, so the device is not read here.
    """
    B, T = execute.shape
    n, H, hd = q.shape
    KV = k.shape[2]
    if B == 1:
        tq = n
    elif plan is None:
        tq = int(execute.sum(1).max())
    else:
        tq = max(plan.per_row)
    b_of, rank, qpos = _packed_positions(execute, flat_idx, tq)
    if B == 1:
        qp = q.transpose(0, 1).unsqueeze(0)  # (1, H, n, hd)
    else:
        qp = q.new_zeros(B, tq, H, hd)
        qp[b_of, rank] = q
        qp = qp.transpose(1, 2)  # (B, H, Tq, hd)

    if mask is None:  # stock sdpa: is_causal (upper-left), keys cropped to T
        past, rows, causal = 0, None, True
        KV = min(KV, T)
    else:
        past = KV - T
        m = mask[:, 0]
        rows = m[0][qpos] if m.shape[0] == 1 else m[torch.arange(B, device=m.device).unsqueeze(1), qpos]
        rows = rows.unsqueeze(1)  # (B, 1, Tq, KV)
        causal = _is_causal_mask(mask, past)

    n_chunks = max(1, min(_MAX_CHUNKS, tq // _MIN_CHUNK)) if causal else 1
    size = math.ceil(tq / n_chunks)
    starts = list(range(0, tq, size))
    ends = [min(s + size, tq) for s in starts]
    if causal:
        if plan is None:
            qpos_h = qpos
        else:  # the same positions from the host copy of the decisions
            idx_h = plan.host.reshape(-1).nonzero().squeeze(-1)
            qpos_h = _packed_positions(plan.host, idx_h, tq)[2]
        last = qpos_h[:, [e - 1 for e in ends]].amax(0)
        limits = (last + past + 1).clamp(max=KV).tolist()
    else:
        limits = [KV] * len(starts)
    outs = []
    for s, e, lim in zip(starts, ends, limits, strict=True):
        if rows is None:
            cm = torch.arange(lim, device=q.device) <= qpos[:, s:e, None]  # (B, c, lim)
            cm = cm.unsqueeze(1)
        else:
            cm = rows[:, :, s:e, :lim]
        outs.append(_sdpa(attn, qp[:, :, s:e], k[:, :, :lim], v[:, :, :lim], cm))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)  # (B, H, Tq, hd)
    out = out.transpose(1, 2)  # (B, Tq, H, hd)
    out = out[0] if B == 1 else out[b_of, rank]
    return out.reshape(n, H * hd)
