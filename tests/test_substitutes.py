"""Skip to a substitute: low-rank stand-ins for skipped modules (``skipgpt.substitutes``).

The fast path against the masked reference with substitutes (prefill, decode, batched, padded,
all-skip, none-skip, the device path), zero init = plain skipping, what trains, save -> load,
the closed-form fit, and the honest accounting (budget, costs, sparsity stats).
"""

from __future__ import annotations

import pytest
import torch
from test_fast import ATOL, VOCAB, batch, decode_logits, run, tiny_config
from transformers import AutoModelForCausalLM

from skipgpt import SkipGPTConfig, SkipGPTModel, get_skipgpt_model
from skipgpt.costs import CostModel, ForwardRecord, routing_cost
from skipgpt.errors import SkipGPTError
from skipgpt.fast import sync_policy
from skipgpt.substitutes import Substitute, fit_substitutes, reduced_rank_fit

ADAPTERS = {"attn_skip_to": "adapter", "mlp_skip_to": "adapter"}


def base(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def substituted(arch: str = "llama", randomise: bool = True, **config):
    """A tiny routed model whose skipped modules run substitutes (random ones unless told)."""
    model = get_skipgpt_model(base(arch), SkipGPTConfig(**{**ADAPTERS, **config}), base_spec="tiny-llama")
    if randomise:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in model.routed_layers:
                for p in layer.substitutes.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# -- the config ------------------------------------------------------------------------------------
def test_config_defaults_and_refusals():
    c = SkipGPTConfig()
    assert c.substituted == () and c.rank_for(576) == 36
    assert SkipGPTConfig(mlp_skip_to="adapter", substitute_rank=8).substituted == ("mlp",)
    assert SkipGPTConfig(modules=("attn",), mlp_skip_to="adapter").substituted == ()  # mlp not routed
    with pytest.raises(SkipGPTError, match="mlp_skip_to must be one of"):
        SkipGPTConfig(mlp_skip_to="mlp")
    with pytest.raises(SkipGPTError, match="substitute_rank"):
        SkipGPTConfig(substitute_rank=0)
    with pytest.raises(SkipGPTError, match="needs substitute_activation 'identity'"):
        SkipGPTConfig(substitute_init="closed-form", substitute_activation="silu")
    assert SkipGPTConfig.from_dict(SkipGPTConfig(**ADAPTERS).to_dict()) == SkipGPTConfig(**ADAPTERS)


def test_default_model_has_no_substitutes():
    model = get_skipgpt_model(base(), SkipGPTConfig())
    assert all(len(layer.substitutes) == 0 for layer in model.routed_layers)
    assert not any(k.startswith("substitutes.") for k in model.router_state_dict())
    assert model.folder_record().substitutes is None


# -- zero init = plain skipping ----------------------------------------------------------------------
@pytest.mark.parametrize("execution", ["masked", "fast"])
def test_zero_init_equals_plain_skipping(execution):
    plain = get_skipgpt_model(base(), SkipGPTConfig())
    subs = substituted(randomise=False, substitute_rank=8)
    ids, mask = batch("left")
    a = run(plain, execution, 0.5, lambda: plain(input_ids=ids, attention_mask=mask).logits)
    b = run(subs, execution, 0.5, lambda: subs(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(a, b)


def test_substitute_changes_skipped_tokens_only():
    """Nothing skips: substitutes never run; everything skips: they change the output."""
    model = substituted()
    ids, _ = batch(None)
    with torch.no_grad(), model.dense():
        dense = model(input_ids=ids).logits
    for execution in ("masked", "fast"):
        none = run(model, execution, 0.0, lambda: model(input_ids=ids).logits)
        torch.testing.assert_close(none, dense, atol=ATOL, rtol=0)
    plain = get_skipgpt_model(base(), SkipGPTConfig())
    skipped_plain = run(plain, "fast", 1.0, lambda: plain(input_ids=ids).logits)
    skipped_sub = run(model, "fast", 1.0, lambda: model(input_ids=ids).logits)
    assert (skipped_plain - skipped_sub).abs().max() > 1e-3


# -- fast == masked reference with substitutes ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("p_skip", [0.0, 0.5, 1.0])
def test_prefill_fast_equals_masked(arch, padding, p_skip):
    model = substituted(arch)
    ids, mask = batch(padding)
    am = None if padding is None else mask
    ref = run(model, "masked", p_skip, lambda: model(input_ids=ids, attention_mask=am).logits)
    out = run(model, "fast", p_skip, lambda: model(input_ids=ids, attention_mask=am).logits)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("p_skip", [0.0, 0.5, 1.0])
def test_decode_fast_equals_masked(arch, padding, B, p_skip):
    """Prefill then decode with a cache; skipping tokens' K/V are written as without substitutes."""
    model = substituted(arch)
    ids, mask = batch(padding if B > 1 else None, B=B, T=9)
    steps = 7
    ref, ref_keys = run(model, "masked", p_skip, lambda: decode_logits(model, ids, mask, steps))
    out, out_keys = run(model, "fast", p_skip, lambda: decode_logits(model, ids, mask, steps))
    real = torch.cat([mask, torch.ones(B, steps, dtype=mask.dtype)], 1).bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)
    for a, b in zip(out_keys, ref_keys, strict=True):
        torch.testing.assert_close(a[:, :, -steps:], b[:, :, -steps:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("B", [1, 3])
def test_device_path_equals_masked(B):
    """The GPU's path (decisions read once per layer into HostPlans, skip plans included), on a CPU."""
    model = substituted()
    ids, mask = batch("left" if B > 1 else None, B=B, T=9)
    ref, _ = run(model, "masked", 0.5, lambda: decode_logits(model, ids, mask, 5))
    with sync_policy("device"):
        out, _ = run(model, "fast", 0.5, lambda: decode_logits(model, ids, mask, 5))
    real = torch.cat([mask, torch.ones(B, 5, dtype=mask.dtype)], 1).bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_learned_routers_fast_equals_masked():
    """The routers themselves decide (fused routers, host bools at batch-1 decode)."""
    model = substituted(mlp_skip_to="adapter", attn_skip_to="identity")
    for layer in model.routed_layers:
        for router in layer.routers.values():
            torch.nn.init.normal_(router.net[-1].weight, std=1.0)
            torch.nn.init.zeros_(router.net[-1].bias)
    ids, mask = batch(None, B=1, T=9)
    with torch.no_grad(), model.routing(execution="masked"):
        ref, _ = decode_logits(model, ids, mask, 5)
    with torch.no_grad(), model.routing(execution="fast"):
        out, _ = decode_logits(model, ids, mask, 5)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# -- training --------------------------------------------------------------------------------------
def test_only_routers_and_substitutes_train():
    model = substituted(randomise=False)
    model.mark_only_routers_trainable()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".routers." in n or ".substitutes." in n for n in trainable)
    assert any(".substitutes." in n for n in trainable)
    model.train()
    model.set_temperature(1.0)
    ids, _ = batch(None)
    torch.manual_seed(0)
    loss = model(input_ids=ids, labels=ids).loss + model.realised_sparsity()
    loss.backward()
    subs = [p for layer in model.routed_layers for p in layer.substitutes.parameters()]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in subs)  # the up side, from zero
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


# -- save / load -----------------------------------------------------------------------------------
def test_save_load_identical_logits(tmp_path):
    model = substituted(substitute_rank=8)
    model.save_pretrained(tmp_path / "out")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "out" / "routers.safetensors"))
    assert any(k.startswith("substitutes.layers.0.mlp.") for k in keys)
    loaded = SkipGPTModel.from_pretrained(tmp_path / "out", base_model=base())
    from skipgpt import checkpoint

    record = checkpoint.read(tmp_path / "out")
    assert record.substitutes["rank"] == 8 and record.substitutes["modules"] == ["attn", "mlp"]
    ids, mask = batch("left")
    for execution in ("masked", "fast"):
        a = run(model, execution, 0.5, lambda: model(input_ids=ids, attention_mask=mask).logits)
        b = run(loaded, execution, 0.5, lambda: loaded(input_ids=ids, attention_mask=mask).logits)
        assert torch.equal(a, b)


def test_loading_routers_without_substitutes_is_refused(tmp_path):
    get_skipgpt_model(base(), SkipGPTConfig(), base_spec="tiny-llama").save_pretrained(tmp_path / "plain")
    model = substituted()
    with pytest.raises(SkipGPTError, match="missing, e.g. substitutes.layers"):
        model.load_routers(tmp_path / "plain" / "routers.safetensors")


# -- closed-form fit -------------------------------------------------------------------------------
def test_reduced_rank_fit_recovers_a_low_rank_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    true = torch.randn(16, 3, generator=g) @ torch.randn(3, 12, generator=g)
    y = x @ true + 0.5
    down, up, bias = reduced_rank_fit(x, y, rank=3)
    assert down.shape == (3, 16) and up.shape == (12, 3)
    torch.testing.assert_close(x @ down.T @ up.T + bias, y, atol=1e-2, rtol=1e-3)  # up to the ridge


def test_moments_fit_streams_and_reports_its_error():
    """Fitting from moments added in pieces = fitting all tokens at once; the error it reports is
    the error of the map it returns."""
    from skipgpt.substitutes import RegressionMoments

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(500, 10, generator=g), torch.randn(500, 6, generator=g)
    whole, parts = RegressionMoments(), RegressionMoments()
    whole.add(x, y)
    for s in range(0, 500, 128):
        parts.add(x[s : s + 128], y[s : s + 128])
    (down, up, bias), error = parts.fit(2)
    for a, b in zip((down, up, bias), whole.fit(2)[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    fitted = x @ down.T @ up.T + bias
    direct = float((y - fitted).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert error == pytest.approx(direct, rel=1e-3) and 0 < error < 1


def test_closed_form_reduces_output_error():
    model = substituted(randomise=False, substitute_rank=8)
    blocks = torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    report = fit_substitutes(model, blocks, max_tokens=64)
    assert report["tokens"] == 64
    assert all(0 <= e < 1.0 for e in report["relative_error"].values())
    # on those tokens, with every MLP skipped, the substitutes bring the logits closer to dense
    ids = blocks[:2]
    with torch.no_grad(), model.dense():
        dense = model(input_ids=ids).logits
    plain = get_skipgpt_model(base(), SkipGPTConfig())

    def all_mlps_skip(m):
        return lambda: m(input_ids=ids).logits

    skip_all = {"override": lambda i, module, h: torch.full(h.shape[:2], module == "attn")}
    with torch.no_grad(), model.routing(**skip_all):
        fitted = model(input_ids=ids).logits
    with torch.no_grad(), plain.routing(**skip_all):
        removed = plain(input_ids=ids).logits
    assert (fitted - dense).pow(2).mean() < (removed - dense).pow(2).mean()


def test_fit_needs_substitutes():
    with pytest.raises(SkipGPTError, match="no substitutes to fit"):
        fit_substitutes(get_skipgpt_model(base(), SkipGPTConfig()), torch.ones(1, 4, dtype=torch.long))


def test_fit_only_some_pairs():
    model = substituted(randomise=False, mlp_skip_to="adapter", attn_skip_to="identity")
    blocks = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    report = fit_substitutes(model, blocks, pairs=[(1, "mlp")])
    assert set(report["relative_error"]) == {"1.mlp"}
    assert model.routed_layers[1].substitutes["mlp"].up.weight.any()
    assert not model.routed_layers[0].substitutes["mlp"].up.weight.any()
    with pytest.raises(SkipGPTError, match="no substitute at"):
        fit_substitutes(model, blocks, pairs=[(1, "attn")])


def test_substitute_shapes_and_zero_output():
    sub = Substitute(64, 4)
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    out = sub(x)
    assert out.shape == x.shape and out.dtype == torch.float64 and not out.any()


# -- honest accounting -----------------------------------------------------------------------------
def test_params_budget_counts_substitutes_as_executed():
    plain = get_skipgpt_model(base(), SkipGPTConfig(budget="params"))
    subs = substituted(budget="params", substitute_rank=8)
    ids, _ = batch(None)
    for m in (plain, subs):
        run(m, "masked", 1.0, lambda m=m: m(input_ids=ids).logits)
    total = sum(plain.branch_params.values())
    sub_total = sum(subs.substitute_params.values())
    assert sub_total == 3 * 2 * (64 * 8 + 8 * 64 + 64)
    assert plain.realised_sparsity().item() == pytest.approx(1.0)
    assert subs.realised_sparsity().item() == pytest.approx((total - sub_total) / total)
    stats = subs.sparsity_stats()
    assert stats["params"] == pytest.approx(1.0)
    assert stats["params_net"] == pytest.approx((total - sub_total) / total)
    assert plain.sparsity_stats()["params_net"] == plain.sparsity_stats()["params"]


def test_cost_model_charges_substitutes():
    cfg = tiny_config("llama")
    plain = CostModel.from_config(cfg)
    subs = CostModel.from_config(cfg, substitute_ranks={"mlp": 8})
    assert subs.substitute("mlp") == 2 * (2 * 64 * 8 + 64) and subs.substitute("attn") == 0
    skip_all = {(i, m): torch.zeros(1, 10, dtype=torch.bool) for i in range(3) for m in ("attn", "mlp")}
    a = routing_cost(plain, [ForwardRecord(batch=1, length=10, execute=skip_all)])
    b = routing_cost(subs, [ForwardRecord(batch=1, length=10, execute=skip_all)])
    assert b["substitute_flops"] == 30 * subs.substitute("mlp") and a["substitute_flops"] == 0
    assert b["skipped_flops"] == pytest.approx(a["skipped_flops"] - b["substitute_flops"])
    assert b["ideal_speedup"] < a["ideal_speedup"]
    assert CostModel.for_model(substituted(substitute_rank=8)).substitute("attn") == subs.substitute("mlp")


# -- stage 1 -----------------------------------------------------------------------------------------
def test_stage1_trains_closed_form_substitutes_and_saves_them(tmp_path):
    from skipgpt.train.loop import LoopArgs
    from skipgpt.train.router_tuning import RouterTuningArgs, train_routers

    model = substituted(
        randomise=False, mlp_skip_to="adapter", attn_skip_to="identity", substitute_init="closed-form"
    )
    frozen = {
        n: p.detach().clone()
        for n, p in model.hf_model.named_parameters()
        if ".substitutes." not in n and ".routers." not in n
    }
    blocks = torch.randint(1, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    loop = LoopArgs(max_steps=2, batch_size=2, lr=1e-2, save_every=2)
    result = train_routers(
        model, blocks, tmp_path / "out", loop, RouterTuningArgs(calibrate_blocks=0), progress=False
    )
    fit = checkpoint_metadata(tmp_path / "out")["substitutes_fit"]
    assert fit["tokens"] == 128 and set(fit["relative_error"]) == {"0.mlp", "1.mlp", "2.mlp"}
    assert result["steps"] == 2
    for n, p in model.hf_model.named_parameters():  # the base stayed frozen
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    loaded = SkipGPTModel.from_pretrained(tmp_path / "out", base_model=base())
    ids, mask = batch("left")
    a = run(model.eval(), "fast", 0.5, lambda: model(input_ids=ids, attention_mask=mask).logits)
    b = run(loaded, "fast", 0.5, lambda: loaded(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(a, b)


def checkpoint_metadata(folder):
    from skipgpt import checkpoint

    return checkpoint.read(folder).metadata


# -- the static baseline ---------------------------------------------------------------------------
def test_static_substitute_baseline(tmp_path):
    from skipgpt.baselines.substitute import save_static_substitute, static_substitute_prune

    blocks = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model, record = static_substitute_prune(
        base(), blocks, 0.2, rank=4, base_spec="tiny-llama", progress=False
    )
    replaced = record["replaced_mlps"]
    assert len(replaced) == 1 and record["rank"] == 4  # an MLP is ~0.2 of the tiny model's params
    assert record["sparsity"]["params_net"] < record["sparsity"]["params"]
    ids, mask = batch("left")
    with torch.no_grad():
        model.reset_stats()
        fast = model(input_ids=ids, attention_mask=mask).logits
        stats = model.sparsity_stats()
        assert stats["per_layer"]["mlp"] == [1.0 if i in replaced else 0.0 for i in range(3)]
        assert stats["params_net"] == pytest.approx(record["sparsity"]["params_net"])
        with model.routing(execution="masked"):
            masked = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fast[mask.bool()], masked[mask.bool()], atol=ATOL, rtol=0)
    save_static_substitute(model, tmp_path / "out", record)
    from skipgpt import checkpoint

    assert checkpoint.read(tmp_path / "out").kind == "routed"
    loaded = SkipGPTModel.from_pretrained(tmp_path / "out", base_model=base())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, fast)


def test_cli_baseline_substitute_then_eval(tmp_path, capsys):
    import json

    from skipgpt.cli import main

    out = tmp_path / "sub"
    argv = ["baseline", "substitute", "--model", "random:llama", "--sparsity", "0.2", "--output", str(out)]
    assert main(argv + ["--seq-len", "16", "--calib-blocks", "2", "--rank", "4", "--json"]) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert built["method"] == "static-substitute" and built["rank"] == 4 and built["replaced_mlps"]
    assert built["sparsity"]["params_net"] < built["sparsity"]["params"]
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert (
        main(["eval", "ppl", "--model", str(out), "--dataset", str(text), "--seq-len", "32", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ppl"] > 0


def test_compare_runs_the_static_substitute_method(tmp_path, capsys):
    import json

    from skipgpt.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(3000)))
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "random:llama", "--sparsity", "0.25", "--out", str(out), "--json"]
    argv += ["--methods", "substitute", "--dataset", str(text), "--eval-datasets", str(text)]
    argv += ["--seq-len", "16", "--max-blocks", "4", "--calib-blocks", "2"]
    argv += ["--eval-seq-len", "32", "--max-windows", "1", "--speed-tokens", "0"]
    assert main(argv) == 0
    result = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["dense", "substitute"]
    row = result["rows"][1]
    assert row["build"]["replaced_mlps"] and row["sparsity"]["mlp"] > 0 and row["ppl"][str(text)] > 0


def test_calibrate_and_export_carry_substitutes(tmp_path, capsys):
    """A folder with substitutes through ``skipgpt calibrate`` and ``skipgpt export``: the copies
    hold the same substitutes and give the same logits (at the same θ)."""
    from skipgpt.cli import main
    from skipgpt.loading import load_model
    from skipgpt.specs import load_base_model

    hf, _ = load_base_model("random:llama")
    model = get_skipgpt_model(hf, SkipGPTConfig(**ADAPTERS, substitute_rank=4), base_spec="random:llama")
    with torch.no_grad():
        for p in model.routed_layers[0].substitutes.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    argv = ["calibrate", "--model", str(tmp_path / "src"), "--target-sparsity", "0.3", "--dataset", str(text)]
    assert main(argv + ["--seq-len", "16", "--blocks", "2", "--output", str(tmp_path / "cal")]) == 0
    assert main(["export", "--model", str(tmp_path / "cal"), "--output", str(tmp_path / "exp")]) == 0
    capsys.readouterr()
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    cal, _ = load_model(str(tmp_path / "cal"))
    exp, _ = load_model(str(tmp_path / "exp"))
    want = model.router_state_dict()
    for m in (cal, exp):
        got = m.router_state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if k.startswith("substitutes."))
    with torch.no_grad():
        assert torch.equal(cal(input_ids=ids).logits, exp(input_ids=ids).logits)


def test_vllm_prepare_carries_substitutes(tmp_path):
    """The prepared vLLM folder holds the substitutes beside the routers (served, see test_serve)."""
    from conftest import routed
    from safetensors.torch import load_file

    from skipgpt.serving.prepare import ROUTERS_SUBDIR, prepare_serving_folder

    model, _ = routed("llama", **ADAPTERS)  # its base loads again by spec (random:llama)
    model.save_pretrained(tmp_path / "src")
    out = prepare_serving_folder(tmp_path / "src")
    saved = load_file(str(out / ROUTERS_SUBDIR / "routers.safetensors"))
    want = model.router_state_dict()
    assert any(k.startswith("substitutes.") for k in saved) and set(saved) == set(want)
    assert all(torch.equal(saved[k], want[k].cpu()) for k in want)
