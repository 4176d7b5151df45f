"""Batched decode on the real gather/scatter kernel, compared with the masked reference on outputs.

A decode step (T == 1) with B > 1 runs the gather path of ``skipgpt.fast`` only when at most a
quarter of the sequences execute (``4 n <= B``; above that ``_decode_runs_all_rows`` computes every
row, which is the masked computation again). Here B = 24 and the routing keeps ``n <= 6``, so
the attention goes through ``_decode_attention`` (one SDPA per run of consecutive executing
sequences, or one gathered SDPA when the runs are more than ``_MAX_DECODE_RUNS``) and the MLP
through ``index_select``/``index_add``. Each test counts those calls, so it cannot pass by never
reaching the kernel, and compares with ``execution="masked"`` under identical decisions:

* the logits of the prefill (real tokens) and of every decode step;
* the KV cache afterwards, keys and values of every layer at every real position (a sequence
  that skips a module still writes its K/V).
"""

from __future__ import annotations

import pytest
import torch
from test_fast import VOCAB, make_model  # the same tiny llama / mistral (window 6) / qwen3 configs
from transformers import DynamicCache

from skipgpt import fast as fast_mod
from skipgpt.adapters import model_cache_argument

ATOL = 1e-5
B = 24  # 4 n <= B for n <= 6: up to 6 isolated executing sequences, more runs than _MAX_DECODE_RUNS
PROMPT = 9
STEPS = 8  # past the sliding window (6) of mistral / qwen3's sliding layers
ARCHS = ["llama", "mistral", "qwen3"]
PATTERNS = ["few-runs", "many-runs", "all-skip", "none-skip", "mixed"]


def prompt(padding: str | None):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, PROMPT), generator=g)
    mask = torch.ones(B, PROMPT, dtype=torch.long)
    for b in range(B):
        pad = b % 5  # 0..4 padding tokens, a different amount in neighbouring rows
        if pad and padding == "left":
            mask[b, :pad] = 0
        elif pad and padding == "right":
            mask[b, PROMPT - pad :] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _runs(gen, k: int, length: int) -> torch.Tensor:
    """k separated runs of up to ``length`` executing sequences, one in each of k equal segments."""
    rows = torch.zeros(B, dtype=torch.bool)
    seg = B // k
    for j in range(k):
        n = int(torch.randint(1, length + 1, (), generator=gen))
        start = j * seg + int(torch.randint(0, seg - n, (), generator=gen))  # a gap before the next segment
        rows[start : start + n] = True
    return rows


def decode_rows(pattern: str, gen) -> torch.Tensor:
    """(B,) execute decisions of one decode step for one module."""
    if pattern == "mixed":
        pattern = ["few-runs", "many-runs", "all-skip", "none-skip", "over-quarter", "one"][
            int(torch.randint(0, 6, (), generator=gen))
        ]
    if pattern == "few-runs":  # 1-3 runs of 1-2 sequences: at most _MAX_DECODE_RUNS runs
        return _runs(gen, int(torch.randint(1, 4, (), generator=gen)), 2)
    if pattern == "many-runs":  # 5-6 isolated sequences: more runs than _MAX_DECODE_RUNS, 4 n <= B
        return _runs(gen, int(torch.randint(5, 7, (), generator=gen)), 1)
    if pattern == "one":
        return torch.arange(B) == int(torch.randint(0, B, (), generator=gen))
    if pattern == "over-quarter":  # every row computed, skipping rows dropped
        return torch.rand(B, generator=gen) < 0.6
    return torch.full((B,), pattern == "none-skip")


def routing(pattern: str, seed: int = 0):
    """override: prefill tokens execute with p = 0.5, decode steps follow ``pattern``; a new
    generator per run, so the masked and the fast run see the same decisions."""
    gen = torch.Generator().manual_seed(seed)

    def override(layer_idx, module, hidden):
        b, t = hidden.shape[:2]
        if t > 1:
            return torch.rand(b, t, generator=gen) >= 0.5
        return decode_rows(pattern, gen).view(b, 1)

    return override


class KernelCalls:
    """Counts the decode kernel's calls: ``_decode_attention`` (per-run loop or gathered K/V) and
    the MLP's index_select/index_add path (the MLP then sees (1, n, d): n gathered rows)."""

    def __init__(self, model, monkeypatch):
        self.attn_loop = self.attn_gather = self.mlp_gather = 0
        self.rows: list[int] = []  # executing sequences per attention kernel call
        original = fast_mod._decode_attention

        def counted(attn, q, k, v, mask, idx, *rest):
            rows = idx.tolist()
            runs = 1 + sum(b != a + 1 for a, b in zip(rows, rows[1:], strict=False))
            if runs > fast_mod._MAX_DECODE_RUNS:
                self.attn_gather += 1
            else:
                self.attn_loop += 1
            self.rows.append(q.shape[0])
            return original(attn, q, k, v, mask, idx, *rest)

        monkeypatch.setattr(fast_mod, "_decode_attention", counted)
        self.hooks = [
            layer.part("mlp").register_forward_pre_hook(self._mlp_input) for layer in model.routed_layers
        ]

    def _mlp_input(self, module, args):
        x = args[0]
        if x.shape[0] == 1 and x.shape[1] < B:  # gathered decode rows (prefill is (B, T, d))
            self.mlp_gather += 1

    def reset(self):
        self.attn_loop = self.attn_gather = self.mlp_gather = 0
        self.rows.clear()

    def remove(self):
        for h in self.hooks:
            h.remove()


def decode(model, ids, mask, padding, execution, pattern):
    """Prefill, then STEPS one-token steps through a DynamicCache; (logits per forward, cache, full mask)."""
    g = torch.Generator().manual_seed(5)
    new = torch.randint(1, VOCAB, (B, STEPS), generator=g)
    cache = DynamicCache(config=model.config)
    kw = {model_cache_argument(model): cache, "use_cache": True}
    logits = []
    with torch.no_grad(), model.routing(override=routing(pattern), execution=execution):
        logits.append(model(input_ids=ids, attention_mask=None if padding is None else mask, **kw).logits)
        for s in range(STEPS):
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            am = None if padding is None else mask
            logits.append(model(input_ids=new[:, s : s + 1], attention_mask=am, **kw).logits)
    return logits, cache, mask


def assert_same_cache(fast_cache, ref_cache, full_mask):
    assert len(fast_cache.layers) == len(ref_cache.layers)
    for i, (a, b) in enumerate(zip(fast_cache.layers, ref_cache.layers, strict=True)):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(b, name)  # (B, KVH, KV, hd); sliding layers keep the tail
            assert x.shape == y.shape, (i, name)
            real = full_mask[:, -x.shape[2] :].bool()  # the cache's positions are the mask's last KV
            assert real.sum() > B  # prompt tokens as well as decoded ones
            torch.testing.assert_close(
                x.transpose(1, 2)[real], y.transpose(1, 2)[real], atol=ATOL, rtol=0, msg=f"layer {i} {name}"
            )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_batched_decode_kernel_equals_masked(arch, padding, pattern, monkeypatch):
    model = make_model(arch)
    ids, mask = prompt(padding)
    calls = KernelCalls(model, monkeypatch)
    try:
        ref, ref_cache, full = decode(model, ids, mask, padding, "masked", pattern)
        assert (calls.attn_loop, calls.attn_gather, calls.mlp_gather) == (0, 0, 0)  # reference: no kernel
        out, out_cache, _ = decode(model, ids, mask, padding, "fast", pattern)
    finally:
        calls.remove()

    layers = model.state.num_layers
    if pattern == "few-runs":  # every decode step of every layer: the per-run loop, never the gather
        assert (calls.attn_loop, calls.attn_gather) == (STEPS * layers, 0)
        assert calls.mlp_gather == STEPS * layers
    elif pattern == "many-runs":  # every one gathers K/V: more runs than the loop handles
        assert (calls.attn_loop, calls.attn_gather) == (0, STEPS * layers)
        assert calls.mlp_gather == STEPS * layers
        assert all(fast_mod._MAX_DECODE_RUNS < n <= B // 4 for n in calls.rows)
    elif pattern == "mixed":
        assert calls.attn_loop > 0 and calls.attn_gather > 0 and calls.mlp_gather > 0
    else:  # nobody / everybody executes: no gather at all
        assert (calls.attn_loop, calls.attn_gather, calls.mlp_gather) == (0, 0, 0)

    real_prompt = mask.bool()
    torch.testing.assert_close(out[0][real_prompt], ref[0][real_prompt], atol=ATOL, rtol=0)
    for step, (a, b) in enumerate(zip(out[1:], ref[1:], strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"decode step {step}")
    assert_same_cache(out_cache, ref_cache, full)
    if pattern != "none-skip":  # the routing skipped something, so the test compares a real mix
        with torch.no_grad(), model.dense():
            dense, _, _ = decode(model, ids, mask, padding, "masked", pattern)
        assert (dense[-1] - ref[-1]).abs().max() > 1e-3


def test_decode_kernel_reached_with_a_static_cache(monkeypatch):
    """The kernel reads the cache through views: a StaticCache (preallocated, masked tail) too."""
    from transformers import StaticCache

    model = make_model("llama")
    ids, mask = prompt("left")
    calls = KernelCalls(model, monkeypatch)
    outs = {}
    try:
        for execution in ("masked", "fast"):
            cache = StaticCache(config=model.config, max_cache_len=PROMPT + STEPS + 3)
            kw = {model_cache_argument(model): cache, "use_cache": True}
            m = mask
            steps = []
            with torch.no_grad(), model.routing(override=routing("mixed", seed=3), execution=execution):
                steps.append(model(input_ids=ids, attention_mask=m, **kw).logits[:, -1])
                for s in range(STEPS):
                    m = torch.cat([m, torch.ones(B, 1, dtype=m.dtype)], 1)
                    tok = ids[:, s : s + 1]
                    steps.append(model(input_ids=tok, attention_mask=m, **kw).logits[:, -1])
            outs[execution] = (torch.stack(steps), cache)
    finally:
        calls.remove()
    assert calls.attn_loop > 0 and calls.attn_gather > 0 and calls.mlp_gather > 0
    torch.testing.assert_close(outs["fast"][0][1:], outs["masked"][0][1:], atol=ATOL, rtol=0)
    n = PROMPT + STEPS
    full = torch.cat([mask, torch.ones(B, STEPS, dtype=mask.dtype)], 1).bool()
    for a, b in zip(outs["fast"][1].layers, outs["masked"][1].layers, strict=True):
        for name in ("keys", "values"):
            x, y = getattr(a, name)[:, :, :n], getattr(b, name)[:, :, :n]
            torch.testing.assert_close(x.transpose(1, 2)[full], y.transpose(1, 2)[full], atol=ATOL, rtol=0)
