"""The fast (really skipping) execution against the masked reference, on tiny random models.

Every comparison runs the same routing twice (``override`` with the same seed, so both
paths see identical decisions) and compares logits of real (non-padding) tokens.
No timing assertions here: speed lives in ``benchmarks/bench_speed.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import cache_kwargs
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt import fast as fast_mod

ATOL = 1e-5
VOCAB = 101
ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
# families the adapters also support: sandwich norms + q/k norms (Gemma 3), post-norms with
# full-width q/k norms (OLMo-2), fused qkv_proj (Phi-3), Gemma 2 with softcapping switched off
MORE_ARCHS = ["gemma3", "olmo2", "phi3", "gemma2-nocap"]


def tiny_config(arch: str, **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # spread logits: greedy decoding has clear winners
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    common.update(extra)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":  # a window smaller than the sequences, so it matters
        return MistralConfig(sliding_window=6, **common)
    if arch == "qwen2":  # layers 1.. slide, layer 0 is full
        return Qwen2Config(use_sliding_window=True, sliding_window=6, max_window_layers=1, **common)
    if arch == "qwen3":  # q_norm / k_norm
        return Qwen3Config(
            head_dim=16, use_sliding_window=True, sliding_window=6, max_window_layers=2, **common
        )
    if arch == "gemma3":
        types = ["sliding_attention", "full_attention", "sliding_attention"]
        return AutoConfig.for_model(
            "gemma3_text",
            head_dim=16,
            sliding_window=6,
            query_pre_attn_scalar=16,
            layer_types=types,
            **common,
        )
    if arch in ("gemma2", "gemma2-nocap"):
        cap = {"attn_logit_softcapping": None} if arch == "gemma2-nocap" else {}
        return AutoConfig.for_model(
            "gemma2", head_dim=16, sliding_window=6, query_pre_attn_scalar=16, **cap, **common
        )
    if arch in ("olmo2", "phi3"):
        return AutoConfig.for_model(arch, **common)
    raise ValueError(arch)


def make_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, **router_config):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = "eager" if arch.startswith("gemma2") else attn_implementation  # no sdpa
    model = AutoModelForCausalLM.from_config(config).eval()
    return get_skipgpt_model(model, SkipGPTConfig(**router_config))


def random_routing(p_skip: float, seed: int = 0):
    """override: each (token, module) skips with probability p_skip; same seed -> same decisions."""
    gen = torch.Generator().manual_seed(seed)

    def override(layer_idx, module, hidden):
        return torch.rand(hidden.shape[:2], generator=gen) >= p_skip

    return override


def run(model, execution, p_skip, fn, seed=0):
    with torch.no_grad(), model.routing(override=random_routing(p_skip, seed), execution=execution):
        return fn()


def batch(padding: str | None, B: int = 3, T: int = 13, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :7] = 0
    elif padding == "right":
        mask[1, -4:] = 0
        mask[2, -7:] = 0
    if padding is not None:
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def half_skipping_routers(model):
    """Router weights that make the routers themselves (no override) skip about half the tokens."""
    for layer in model.routed_layers:
        for router in layer.routers.values():
            torch.nn.init.normal_(router.net[-1].weight, std=1.0)
            torch.nn.init.zeros_(router.net[-1].bias)


P_SKIPS = [0.0, 0.4, 0.7, 1.0]


# -- prefill ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("p_skip", P_SKIPS)
def test_prefill_fast_equals_masked(arch, padding, p_skip):
    model = make_model(arch)
    ids, mask = batch(padding)
    am = None if padding is None else mask

    def fwd():
        return model(input_ids=ids, attention_mask=am).logits

    ref = run(model, "masked", p_skip, fwd)
    out = run(model, "fast", p_skip, fwd)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("p_skip", [0.4, 1.0])
def test_prefill_eager_attention(p_skip):
    model = make_model("mistral", attn_implementation="eager")
    ids, mask = batch("left")
    ref = run(model, "masked", p_skip, lambda: model(input_ids=ids, attention_mask=mask).logits)
    out = run(model, "fast", p_skip, lambda: model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


def test_long_prefill_uses_chunks_and_matches():
    """T large enough for several query chunks (the key range stops at each chunk's last query)."""
    model = make_model("llama")
    ids, mask = batch(None, B=2, T=200)
    for p in (0.3, 0.8):
        ref = run(model, "masked", p, lambda: model(input_ids=ids).logits)
        out = run(model, "fast", p, lambda: model(input_ids=ids).logits)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# -- incremental decode with the KV cache ----------------------------------------------------------
def decode_logits(model, ids, mask, steps: int, chunk: int = 1, seed: int = 5):
    """Prefill ``ids``, then feed ``steps`` fixed tokens ``chunk`` at a time with a DynamicCache."""
    g = torch.Generator().manual_seed(seed)
    new = torch.randint(1, VOCAB, (ids.shape[0], steps), generator=g)
    cache = DynamicCache(config=model.config)
    out = [model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache)).logits]
    for s in range(0, steps, chunk):
        tok = new[:, s : s + chunk]
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        out.append(model(input_ids=tok, attention_mask=mask, **cache_kwargs(model, cache)).logits)
    keys = [layer.keys for layer in cache.layers]
    return torch.cat(out, 1), keys


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("p_skip", P_SKIPS)
def test_decode_fast_equals_masked(arch, padding, p_skip):
    model = make_model(arch)
    ids, mask = batch(padding, T=9)
    steps = 8  # past the sliding window of 6
    ref, ref_keys = run(model, "masked", p_skip, lambda: decode_logits(model, ids, mask, steps))
    out, out_keys = run(model, "fast", p_skip, lambda: decode_logits(model, ids, mask, steps))
    real = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype)], 1).bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)
    for a, b in zip(out_keys, ref_keys, strict=True):  # skipped tokens still wrote their K/V
        assert a.shape == b.shape
        torch.testing.assert_close(a[:, :, -steps:], b[:, :, -steps:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_decode_fast_equals_masked(arch):
    """Several new tokens per step against a filled cache (speculative/chunked prefill shape)."""
    model = make_model(arch)
    ids, mask = batch("left", T=7)
    ref, _ = run(model, "masked", 0.5, lambda: decode_logits(model, ids, mask, 9, chunk=3))
    out, _ = run(model, "fast", 0.5, lambda: decode_logits(model, ids, mask, 9, chunk=3))
    real = torch.cat([mask, torch.ones(mask.shape[0], 9, dtype=mask.dtype)], 1).bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_decode_many_runs_gathers():
    """Batch large enough that executing sequences form more runs than the loop handles."""
    model = make_model("llama")
    ids, mask = batch(None, B=16, T=5)
    ref, _ = run(model, "masked", 0.5, lambda: decode_logits(model, ids, mask, 4))
    out, _ = run(model, "fast", 0.5, lambda: decode_logits(model, ids, mask, 4))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# -- generate --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("p_skip", [0.0, 0.4, 1.0])
def test_greedy_generate_identical(arch, p_skip):
    model = make_model(arch)
    ids, mask = batch("left", T=8)

    def gen():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)

    ref = run(model, "masked", p_skip, gen)
    out = run(model, "fast", p_skip, gen)
    assert out.shape == (3, 18)
    assert torch.equal(out, ref)


def test_batched_sampling_generate_runs():
    model = make_model("qwen3")
    ids, mask = batch("left", T=8)
    torch.manual_seed(0)
    out = run(
        model,
        "fast",
        0.4,
        lambda: model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20
        ),
    )
    assert out.shape == (3, 14)
    assert bool(((out >= 0) & (out < VOCAB)).all())


@pytest.mark.parametrize("router_norm", ["none", "rms"])
def test_generate_with_trained_style_routers(router_norm):
    """No override: the routers decide (threshold), in both paths."""
    model = make_model("llama", router_norm=router_norm)
    half_skipping_routers(model)
    ids, mask = batch("left", T=8)
    outs = {}
    for execution in ("masked", "fast"):
        model.reset_stats()
        with torch.no_grad(), model.routing(execution=execution):
            outs[execution] = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False
            )
        assert 0.1 < model.sparsity_stats()["module"] < 0.9
    assert torch.equal(outs["fast"], outs["masked"])


@pytest.mark.parametrize("router_norm", ["none", "rms"])
def test_batch1_decode_decided_on_the_host_matches_masked(router_norm):
    """Batch-1 decode reads a layer's two decisions as Python bools in one go (fast path only):
    same tokens, same statistics and same kept decisions as the masked path's tensors."""
    model = make_model("llama", router_norm=router_norm)
    half_skipping_routers(model)
    ids, _ = batch(None, B=1, T=6)
    seen = {}
    for execution in ("masked", "fast"):
        model.reset_stats()
        with torch.no_grad(), model.routing(execution=execution, keep_decisions=True):
            out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
        decisions = {k: [d.tolist() for d in v] for k, v in model.state.decisions.items()}
        seen[execution] = (out, dict(model.state.skipped), dict(model.state.counted), decisions)
    assert torch.equal(seen["fast"][0], seen["masked"][0])
    assert seen["fast"][1:] == seen["masked"][1:]
    assert 0.1 < sum(seen["fast"][1].values()) / sum(seen["fast"][2].values()) < 0.9

    # a lone padding token is counted by neither path; the one-token sparsity is exact
    for execution in ("masked", "fast"):
        model.reset_stats()
        with torch.no_grad(), model.routing(execution=execution):
            model(input_ids=ids[:, :1], attention_mask=torch.zeros(1, 1, dtype=torch.long))
            assert sum(model.state.counted.values()) == 0
            model(input_ids=ids[:, :1])
            rate = float(model.realised_sparsity("modules"))
        assert sum(model.state.counted.values()) == len(model.state.counted)
        assert rate == pytest.approx(sum(model.state.skipped.values()) / len(model.state.skipped), abs=1e-7)


# -- it really skips -------------------------------------------------------------------------------
def count_rows(model, names):
    """Forward hooks counting the rows each named part of layer 0's attention/MLP receives."""
    layer = model.routed_layers[0]
    attn = layer.part("attn")
    mods = {"q": attn.q_proj, "k": attn.k_proj, "o": attn.o_proj, "mlp": layer.part("mlp")}
    seen = {k: 0 for k in names}
    hooks = [
        mods[k].register_forward_hook(
            lambda m, i, o, k=k: seen.__setitem__(k, seen[k] + i[0].shape[:-1].numel())
        )
        for k in names
    ]
    return seen, hooks


def test_fast_path_computes_only_executing_tokens():
    model = make_model("llama")
    ids, mask = batch("left", T=10)
    decided = {}

    def override(layer_idx, module, hidden):
        g = torch.Generator().manual_seed(layer_idx * 2 + (module == "mlp"))
        d = torch.rand(hidden.shape[:2], generator=g) >= 0.5
        decided[(layer_idx, module)] = d
        return d

    seen, hooks = count_rows(model, ["q", "k", "o", "mlp"])
    with torch.no_grad(), model.routing(override=override):
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    real = mask.bool()
    assert seen["k"] == ids.numel()  # K/V for every token
    assert seen["q"] == seen["o"] == int((decided[(0, "attn")] & real).sum())
    assert seen["mlp"] == int((decided[(0, "mlp")] & real).sum())


def test_decode_step_that_skips_runs_only_kv():
    model = make_model("llama")
    ids, mask = batch(None, B=1, T=6)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, cache))
        seen, hooks = count_rows(model, ["q", "k", "o", "mlp"])
        with model.routing(override=lambda i, m, h: torch.zeros(h.shape[:2], dtype=torch.bool)):
            model(input_ids=ids[:, :1], **cache_kwargs(model, cache))
    for h in hooks:
        h.remove()
    assert seen == {"q": 0, "k": 1, "o": 0, "mlp": 0}
    assert cache.get_seq_length() == 7


# -- fallback ----------------------------------------------------------------------------------
def test_unsupported_attention_falls_back_with_one_warning(monkeypatch):
    model = make_model("llama")
    monkeypatch.delitem(fast_mod.ATTENTION_PARTS, "LlamaAttention")
    monkeypatch.setattr(fast_mod, "_warned", set())
    ids, mask = batch("left")
    ref = run(model, "masked", 0.5, lambda: model(input_ids=ids, attention_mask=mask).logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(model, "fast", 0.5, lambda: model(input_ids=ids, attention_mask=mask).logits)
        run(model, "fast", 0.5, lambda: model(input_ids=ids, attention_mask=mask).logits)
    msgs = [str(w.message) for w in caught if "skipgpt fast path" in str(w.message)]
    assert len(msgs) == 1 and "LlamaAttention" in msgs[0]
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


def test_non_causal_4d_mask_is_still_exact():
    """A custom 4D mask that lets queries see later keys: the key range is not cut short."""
    model = make_model("llama")
    ids, _ = batch(None, B=2, T=70)
    full = torch.ones(2, 1, 70, 70, dtype=torch.bool)
    ref = run(model, "masked", 0.5, lambda: model(input_ids=ids, attention_mask=full).logits)
    out = run(model, "fast", 0.5, lambda: model(input_ids=ids, attention_mask=full).logits)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_static_cache_prefill_and_decode(arch):
    """StaticCache: prefill gets no mask (is_causal over a cropped buffer), decode a 4D mask."""
    from transformers import StaticCache

    model = make_model(arch)
    ids, mask = batch(None, B=2, T=9)
    new = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))

    def go():
        cache = StaticCache(config=model.config, max_cache_len=20)
        out = [model(input_ids=ids, **cache_kwargs(model, cache)).logits]
        for s in range(5):
            out.append(model(input_ids=new[:, s : s + 1], **cache_kwargs(model, cache)).logits)
        return torch.cat(out, 1)

    for p in (0.5, 1.0):
        torch.testing.assert_close(run(model, "fast", p, go), run(model, "masked", p, go), atol=ATOL, rtol=0)


# -- cost model ------------------------------------------------------------------------------------
def test_cost_model_by_hand():
    from skipgpt.costs import CostModel, ForwardRecord, routing_cost

    cost = CostModel.from_config(tiny_config("llama"))  # d 64, H 4, KVH 2, hd 16, I 96, V 101, 3 layers
    assert cost.q_o == 2 * 2 * 64 * 64 and cost.k_v == 2 * 2 * 64 * 32
    assert cost.mlp == 2 * 3 * 64 * 96 and cost.lm_head == 2 * 64 * VOCAB
    dense = routing_cost(cost, [ForwardRecord(1, 4, logits_tokens=1)])
    ctx = 4 * 4 * 16 * (1 + 2 + 3 + 4)  # attention over positions 1..4, per layer
    assert dense["dense_flops"] == 3 * (4 * (cost.q_o + cost.k_v + cost.mlp) + ctx) + cost.lm_head
    assert dense["ideal_speedup"] == 1.0

    # token 3 (context 4) skips attention at layer 0; tokens 0, 1 skip the MLP at layer 2
    ex = {
        (0, "attn"): torch.tensor([[True, True, True, False]]),
        (2, "mlp"): torch.tensor([[False, False, True, True]]),
    }
    r = routing_cost(cost, [ForwardRecord(1, 4, logits_tokens=1, execute=ex)])
    assert r["skipped_flops"] == cost.q_o + 4 * 4 * 16 * 4 + 2 * cost.mlp
    assert r["ideal_speedup"] == pytest.approx(r["dense_flops"] / (r["dense_flops"] - r["skipped_flops"]))


def test_cost_model_sliding_window_and_padding():
    from skipgpt.costs import CostModel, ForwardRecord, routing_cost

    cost = CostModel.from_config(tiny_config("qwen2"))  # window 6 on layers 1, 2
    assert cost.windows == (None, 6, 6)
    pos = torch.arange(10)
    assert cost.context(0, pos).tolist() == list(range(1, 11))
    assert cost.context(1, pos).max() == 6
    mask = torch.tensor([[0, 0, 1, 1]])
    a = routing_cost(cost, [ForwardRecord(1, 4, token_mask=mask, logits_tokens=0)])
    b = routing_cost(cost, [ForwardRecord(1, 4, logits_tokens=0)])
    assert 0 < a["dense_flops"] < b["dense_flops"]  # padding is not work


def test_memory_traffic_view():
    from skipgpt.costs import CostModel, ForwardRecord, routing_traffic

    cost = CostModel.from_config(tiny_config("llama"))
    one = {(i, m): torch.tensor([[False], [True]]) for i in range(3) for m in ("attn", "mlp")}
    none = {(i, m): torch.tensor([[False], [False]]) for i in range(3) for m in ("attn", "mlp")}
    some = routing_traffic(cost, [ForwardRecord(2, 1, past=8, execute=one)])
    all_skip = routing_traffic(cost, [ForwardRecord(2, 1, past=8, execute=none)])
    assert 1.0 < some["ideal_speedup"] < all_skip["ideal_speedup"]  # weights are read unless all skip


# -- benchmark plumbing (no timing assertions) -----------------------------------------------------
def test_run_bench_shape_and_table():
    from skipgpt.eval.speed import format_bench_table, run_bench

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    res = run_bench(
        plain,
        None,
        scenarios=["prefill_2x16", "decode_b2_ctx8"],
        repeats=1,
        warmup=0,
        random_routing=0.4,
        decode_steps=3,
        progress=False,
    )
    assert type(plain.model.layers[0]).__name__ == "LlamaDecoderLayer"  # unwrapped again
    assert {"scenarios", "sparsity", "cost_model", "machine", "settings"} <= set(res)
    names = [s["name"] for s in res["scenarios"]]
    assert names == ["prefill_2x16", "decode_b2_ctx8"]
    for s in res["scenarios"]:
        for key in ("dense_tok_s", "masked_tok_s", "fast_tok_s", "speedup", "ideal_speedup", "efficiency"):
            assert s[key] > 0
        assert s["speedup"] == pytest.approx(s["fast_tok_s"] / s["dense_tok_s"], rel=1e-3, abs=1e-4)
        assert s["efficiency"] == pytest.approx(s["speedup"] / s["ideal_speedup"], rel=1e-3, abs=1e-4)
        assert s["ideal_speedup"] > 1.0 and 0.1 < s["sparsity"]["module"] < 0.7
    assert res["scenarios"][1]["context"] == 8 and "ideal_speedup_memory" in res["scenarios"][1]
    table = format_bench_table(res)
    assert "| prefill_2x16 |" in table and "Cost model" in table and res["machine"] in table
    dec = res["scenarios"][1]
    assert f"(bw {dec['speedup'] / dec['ideal_speedup_memory']:.2f})" in table  # efficiency vs the bw bound


@pytest.mark.parametrize("rate", [None, 0.5])
def test_decode_with_alternating_variants_takes_the_decisions_of_one_run(rate):
    """The benchmark times decode with dense, masked and fast taking turns step by step; the
    fast variant must then route exactly as one uninterrupted run does (trained or random)."""
    from skipgpt.eval.speed import VARIANTS, Runner, VariantRouting, decode_alternating, parse_scenario

    model = make_model("llama")
    half_skipping_routers(model)
    sc = parse_scenario("decode_b3_ctx6", decode_steps=4)
    ids = torch.randint(1, VOCAB, (3 * 10,), generator=torch.Generator().manual_seed(1))
    routing = VariantRouting(model, rate, 0.5, 0, True)
    with torch.inference_mode():
        one = Runner(model, sc, ids)
        with routing("fast"):
            one.prepare()
        model.reset_stats()
        with routing("fast", keep_decisions=True):
            one.run()
        expected = {k: [d.clone() for d in v] for k, v in model.state.decisions.items()}
        model.reset_stats()

        runners = {v: Runner(model, sc, ids) for v in VARIANTS}
        for v, runner in runners.items():
            with routing(v):
                runner.prepare()
        contexts = {v: routing.reentrant(v, keep_decisions=v == "fast") for v in VARIANTS}
        times = decode_alternating(runners, contexts, sc.steps)
        got = model.state.decisions
    assert set(times) == set(VARIANTS) and all(t > 0 for t in times.values())
    assert got.keys() == expected.keys() and len(expected[(0, "attn")]) == sc.steps
    assert all(torch.equal(a, b) for k in expected for a, b in zip(got[k], expected[k], strict=True))
    skipped = sum(float((~torch.cat(v)).sum()) for v in expected.values())
    assert 0 < skipped < sum(torch.cat(v).numel() for v in expected.values())  # a real mix of decisions
    assert all(r.cache.get_seq_length() == 6 for r in runners.values())  # cropped back to the context


def test_run_bench_needs_routing_for_a_plain_model():
    from skipgpt import SkipGPTError
    from skipgpt.eval.speed import parse_scenario, run_bench

    plain = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    with pytest.raises(SkipGPTError, match="random_routing"):
        run_bench(plain, scenarios=["prefill_1x8"], progress=False)
    with pytest.raises(SkipGPTError, match="unknown bench scenario"):
        parse_scenario("prefill_big")
    assert parse_scenario("decode_b8", decode_context=256, decode_steps=10).tokens_per_run == 80


def test_threshold_sweep_rows():
    from skipgpt.eval.speed import format_sweep_table, sweep_threshold

    model = make_model("llama")
    for layer in model.routed_layers:
        for router in layer.routers.values():
            torch.nn.init.normal_(router.net[-1].weight, std=1.0)
    rows = sweep_threshold(
        model,
        thresholds=(0.2, 0.8),
        ppl_fn=lambda m: 12.0,
        scenarios=("prefill_1x16",),
        repeats=1,
        warmup=0,
        progress=False,
    )
    assert [r["threshold"] for r in rows] == [0.2, 0.8]
    assert rows[0]["sparsity"]["module"] < rows[1]["sparsity"]["module"]  # higher θ skips more
    assert "| 0.80 |" in format_sweep_table(rows)


@pytest.mark.parametrize("padding", [None, "right"])
def test_no_cache_forward(padding):
    """use_cache=False (perplexity evaluation): no cache object, K/V of the forward only."""
    model = make_model("qwen2")
    ids, mask = batch(padding, T=20)
    am = None if padding is None else mask

    def fwd():
        return model(input_ids=ids, attention_mask=am, use_cache=False).logits

    ref, out = run(model, "masked", 0.5, fwd), run(model, "fast", 0.5, fwd)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", MORE_ARCHS)
@pytest.mark.parametrize("p_skip", [0.4, 1.0])
def test_more_families_prefill_and_decode(arch, p_skip, monkeypatch):
    monkeypatch.setattr(fast_mod, "_warned", set())
    model = make_model(arch)
    ids, mask = batch("left", T=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # these run on the fast kernel, no fallback
        out, _ = run(model, "fast", p_skip, lambda: decode_logits(model, ids, mask, 8))
    ref, _ = run(model, "masked", p_skip, lambda: decode_logits(model, ids, mask, 8))
    real = torch.cat([mask, torch.ones(mask.shape[0], 8, dtype=mask.dtype)], 1).bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_gemma2_softcapping_falls_back_and_matches(monkeypatch):
    monkeypatch.setattr(fast_mod, "_warned", set())
    model = make_model("gemma2")
    ids, mask = batch("left")
    ref = run(model, "masked", 0.5, lambda: model(input_ids=ids, attention_mask=mask).logits)
    with pytest.warns(UserWarning, match="softcapping"):
        out = run(model, "fast", 0.5, lambda: model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("executing, rows", [(6, 8), (3, 8), (2, 2), (0, 0)])
def test_batched_decode_runs_all_rows_only_when_many_execute(executing, rows):
    """Decode with B = 8: over a quarter executing -> the MLP/q/o see all 8 rows; else only theirs."""
    model = make_model("llama")
    ids, _ = batch(None, B=8, T=5)
    cache = DynamicCache(config=model.config)
    execute = torch.arange(8) < executing
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(model, cache))
        seen, hooks = count_rows(model, ["q", "k", "o", "mlp"])
        with model.routing(override=lambda i, m, h: execute.view(8, 1).expand(h.shape[:2])):
            model(input_ids=ids[:, :1], **cache_kwargs(model, cache))
    for h in hooks:
        h.remove()
    assert seen == {"q": rows, "k": 8, "o": rows, "mlp": rows}


# -- fused routers (inference) ---------------------------------------------------------------------
@pytest.mark.parametrize("router_norm", ["none", "rms"])
@pytest.mark.parametrize("router_hidden", [None, 0])
def test_fused_routers_equal_the_separate_routers_and_follow_weight_changes(router_hidden, router_norm):
    from conftest import routed

    model, _ = routed("llama", router_hidden=router_hidden, router_norm=router_norm)
    layer = model.routed_layers[1]
    for router in layer.routers.values():
        torch.nn.init.normal_(router.net[-1].weight, std=1.0)
    h = torch.randn(3, 7, model.config.hidden_size)
    with torch.no_grad():
        fused = layer.execute_probabilities(h)
        for m, router in layer.routers.items():
            torch.testing.assert_close(fused[m], router.execute_probability(h), rtol=0, atol=1e-6)
        layer.routers["mlp"].net[-1].bias[1] -= 5.0  # in place, as an optimizer or a load does
        moved = layer.execute_probabilities(h)
    torch.testing.assert_close(moved["mlp"], layer.routers["mlp"].execute_probability(h).detach())
    assert not torch.allclose(moved["mlp"], fused["mlp"])  # not served from a stale stack
    torch.testing.assert_close(moved["attn"], fused["attn"])
    first = layer.routers["attn"].net[0]
    first.weight = torch.nn.Parameter(first.weight.detach() * 2)  # a Parameter replaced, not written
    with torch.no_grad():
        replaced = layer.execute_probabilities(h)
        torch.testing.assert_close(replaced["attn"], layer.routers["attn"].execute_probability(h))
    assert not torch.allclose(replaced["attn"], fused["attn"])


def test_inference_decides_both_modules_in_one_router_pass_and_agrees_with_separate_routers():
    model = make_model("llama")
    half_skipping_routers(model)
    ids, mask = batch("left", T=10)
    calls = []
    first = model.routed_layers[0].routers
    hooks = [r.net[0].register_forward_hook(lambda *a: calls.append(1)) for r in first.values()]

    def separate(layer_idx, module, hidden):  # the unfused decision, module by module
        with torch.no_grad():
            return model.routed_layers[layer_idx].routers[module].decide(hidden, model.state.threshold)

    decisions = {}
    for name, override in (("fused", None), ("separate", separate)):
        model.reset_stats()
        with torch.no_grad(), model.routing(override=override):
            model.state.keep_decisions = True
            decisions[name] = model(input_ids=ids, attention_mask=mask).logits
            model.state.keep_decisions = False
        decisions[name + " masks"] = {k: v[0] for k, v in model.state.decisions.items()}
    for h in hooks:
        h.remove()
    assert len(calls) == 2  # only the separate run called layer 0's router modules (one each)
    assert decisions["fused masks"].keys() == decisions["separate masks"].keys()
    for k, v in decisions["fused masks"].items():
        assert torch.equal(v, decisions["separate masks"][k]), k
    torch.testing.assert_close(decisions["fused"], decisions["separate"], rtol=0, atol=1e-5)


def test_routers_are_not_fused_when_their_gradient_is_needed():
    from conftest import routed

    model, _ = routed("llama")
    layer = model.routed_layers[0]
    h = torch.randn(2, 5, model.config.hidden_size)
    p = layer.execute_probability("attn", h)  # grad enabled, trainable routers: separate, differentiable
    p.sum().backward()
    assert layer.routers["attn"].net[0].weight.grad is not None
    post, _ = routed("llama", mlp_router_input="post_attention")
    assert not post.routed_layers[0].fusable_routers()  # the MLP router reads another state


def test_cli_bench_sweeps_the_threshold(tmp_path, capsys):
    import json

    from conftest import routed

    from skipgpt.cli import main

    model, _ = routed("llama")
    for layer in model.routed_layers:  # routers with spread-out decisions
        for router in layer.routers.values():
            torch.nn.init.normal_(router.net[-1].weight, std=1.0)
            torch.nn.init.zeros_(router.net[-1].bias)
    model.save_pretrained(tmp_path / "routed")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = ["bench", "--model", str(tmp_path / "routed"), "--scenarios", "prefill_1x16", "--repeats", "1"]
    sweep = [
        "--sweep",
        "0.2,0.8",
        "--sweep-dataset",
        str(text),
        "--sweep-windows",
        "2",
        "--sweep-seq-len",
        "32",
    ]
    assert main([*args, *sweep, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    low, high = result["sweep"]
    assert (low["threshold"], high["threshold"]) == (0.2, 0.8)
    assert low["sparsity"]["module"] < high["sparsity"]["module"]  # a higher θ skips more
    assert low["ppl"] > 1 and high["ppl"] > 1 and "prefill_1x16" in low["scenarios"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--sweep", "0.5,1.5"])
    assert exc.value.code == 2
    assert "outside [0, 1]" in capsys.readouterr().err
    assert main([*args, *sweep, "--threshold", "0.5"]) == 2
    assert "--sweep sets θ itself" in capsys.readouterr().err


def test_run_bench_with_a_static_cache():
    from skipgpt import SkipGPTError
    from skipgpt.eval.speed import format_bench_table, run_bench

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    kwargs = dict(scenarios=["decode_b2_ctx8"], repeats=1, warmup=0, random_routing=0.4, decode_steps=3)
    res = run_bench(plain, None, cache="static", progress=False, **kwargs)
    assert res["settings"]["cache"] == "StaticCache" and "(StaticCache)" in format_bench_table(res)
    dynamic = run_bench(plain, None, progress=False, **kwargs)
    assert res["scenarios"][0]["sparsity"] == dynamic["scenarios"][0]["sparsity"]  # the same routing taken
    with pytest.raises(SkipGPTError, match="accepted"):
        run_bench(plain, None, cache="paged", progress=False, **kwargs)


# -- benchmarks/bench_speed.py and benchmarks/profile_decode.py, end to end on a tiny model ---------
def _benchmark_script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # profile_decode imports bench_speed
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_bench_and_profile_scripts_write_their_files(tmp_path, capsys):
    import json

    bench = _benchmark_script("bench_speed")
    out = tmp_path / "bench.json"
    common = ["--model", "random:llama", "--random-routing", "0.4"]
    rc = bench.main(
        [*common, "--scenarios", "prefill_1x16,decode_b2_ctx8", "--repeats", "1"]
        + ["--decode-steps", "2", "--cache", "static", "--out", str(out)]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert [s["name"] for s in result["scenarios"]] == ["prefill_1x16", "decode_b2_ctx8"]
    assert result["settings"]["cache"] == "StaticCache" and result["settings"]["decode_alternating"]
    md = out.with_suffix(".md").read_text()
    assert "| decode_b2_ctx8 |" in md and "variants alternating step by step" in md
    assert md.rstrip().endswith("s).") and "--cache static" in md  # the command that made it

    profile = _benchmark_script("profile_decode")
    prof_md = tmp_path / "profile.md"
    rc = profile.main(
        [*common, "--batch", "2", "--context", "8", "--steps", "2", "--cache", "static"]
        + ["--out", str(prof_md)]
    )
    text = prof_md.read_text()
    assert rc == 0 and "(StaticCache)" in text
    assert all(f"### {v}:" in text for v in ("dense", "masked", "fast")) and "aten::" in text
    rc = profile.main([*common, "--prefill", "--batch", "1", "--context", "16", "--out", str(prof_md)])
    text = prof_md.read_text()
    assert rc == 0 and text.startswith("Prefill profile:") and "ms per prefill forward" in text
    assert all(f"### {v}:" in text for v in ("dense", "masked", "fast")) and "aten::" in text
    capsys.readouterr()
