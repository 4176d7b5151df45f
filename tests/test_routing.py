"""Routing policies, the settings / scratch / statistics split, executors and the one-call
architecture registry (``skipgpt.routing``, ``skipgpt.execution``, ``skipgpt.adapters``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids, routed

from skipgpt import SkipGPTConfig, SkipGPTModel, adapters, execution, fast, get_skipgpt_model, load_model
from skipgpt.baselines.llm_drop import apply_removal
from skipgpt.errors import SkipGPTError
from skipgpt.routing import (
    POLICIES,
    REMOVED,
    LearnedPolicy,
    RandomPolicy,
    RoutingPolicy,
    StaticPolicy,
    TopKPolicy,
    make_policy,
)


def _ids(model, batch=2, length=12, seed=0):
    return random_ids(batch, length, model.config.vocab_size, seed)


def _paper_model(arch="llama", **config):
    """Routers with PyTorch's init: p(execute) spread around 0.5, so θ really moves decisions."""
    model, _ = routed(arch, router_init="paper", **config)
    return model.eval()


class _Spy(RoutingPolicy):
    """Wraps a policy and keeps every gate it returned, per (layer, module)."""

    def __init__(self, inner: RoutingPolicy):
        self.inner, self.gates = inner, {}

    def decide(self, layer, module, hidden):
        g = self.inner.decide(layer, module, hidden)
        self.gates.setdefault((layer.layer_idx, module), []).append((g, hidden))
        return g


# -- policies ------------------------------------------------------------------------------------
def test_registry_names_every_policy_and_refuses_unknown_ones():
    assert {"learned", "random", "topk", "override", "static"} <= set(POLICIES)
    assert isinstance(make_policy("random", rates=0.3, seed=1), RandomPolicy)
    with pytest.raises(SkipGPTError, match="unknown routing policy 'nope'; accepted: "):
        make_policy("nope")


def test_learned_policy_thresholds_at_inference_and_samples_in_training():
    model = _paper_model()
    spy = _Spy(LearnedPolicy())
    with torch.no_grad(), model.routing(policy=spy, threshold=0.5):
        model(_ids(model))
    for (i, m), [(gate, hidden)] in spy.gates.items():
        p = model.routed_layers[i].routers[m].execute_probability(hidden)
        assert gate.dtype == torch.bool and torch.equal(gate, p >= 0.5)
    model.train()
    spy = _Spy(LearnedPolicy())
    with model.routing(policy=spy):
        model(_ids(model))
    gate = spy.gates[(0, "attn")][0][0]
    assert gate.requires_grad and set(gate.unique().tolist()) <= {0.0, 1.0}


def test_random_policy_is_seeded_meets_its_rate_and_ignores_router_overhead():
    model = _paper_model()
    ids = _ids(model, 4, 64)
    runs = []
    for overhead in (False, True, True):
        spy = _Spy(RandomPolicy(0.4, seed=3, router_overhead=overhead))
        model.reset_stats()
        with torch.no_grad(), model.routing(policy=spy):
            model(ids)
        runs.append({k: v[0][0] for k, v in spy.gates.items()})
        assert abs(model.sparsity_stats()["module"] - 0.4) < 0.05
    assert all(torch.equal(runs[0][k], r[k]) for r in runs[1:] for k in runs[0])


def test_random_policy_rates_by_module_name_or_by_layer_and_module():
    """{"attn": a, "mlp": m} sets a rate per module kind (benchmarks/gpu_check's form); a
    (layer, module) key wins over it; modules given neither always execute."""
    model = _paper_model()
    ids = _ids(model, 4, 256)
    model.reset_stats()
    with torch.no_grad(), model.routing(policy=RandomPolicy({"attn": 0.5, (0, "mlp"): 1.0}, seed=2)):
        model(ids)
    stats = model.sparsity_stats()
    assert abs(stats["attn"] - 0.5) < 0.05
    assert stats["per_layer"]["mlp"][0] == 1.0 and all(r == 0.0 for r in stats["per_layer"]["mlp"][1:])
    per_module = RandomPolicy({(0, "attn"): 1.0}, seed=0)
    model.reset_stats()
    with torch.no_grad(), model.routing(policy=per_module):
        model(ids)
    rates = model.sparsity_stats()["per_layer"]
    assert rates["attn"][0] == 1.0 and rates["mlp"][0] == 0.0 and rates["attn"][1] == 0.0


def test_topk_policy_executes_the_best_real_tokens_of_each_sequence():
    model = _paper_model()
    ids = _ids(model, 2, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # 6 real tokens in row 0, 10 in row 1
    spy = _Spy(TopKPolicy(0.5, straight_through=False))
    with torch.no_grad(), model.routing(policy=spy):
        model(input_ids=ids, attention_mask=mask)
    for (i, m), [(gate, hidden)] in spy.gates.items():
        assert gate.sum(1).tolist() == [3, 5] and not gate[0, :4].any()
        p = model.routed_layers[i].execute_probability(m, hidden)
        assert p[1][gate[1]].min() >= p[1][~gate[1]].max()  # the highest scores execute
    with pytest.raises(SkipGPTError, match=r"MoD skip rate must be in \[0, 1\)"):
        TopKPolicy(1.0)


def test_override_callable_and_policy_objects_both_route():
    model, _ = routed("llama")
    never = lambda i, m, h: torch.zeros(h.shape[:2], dtype=torch.bool)  # noqa: E731
    for choice in ({"override": never}, {"override": RandomPolicy(1.0)}, {"policy": RandomPolicy(1.0)}):
        model.reset_stats()
        with torch.no_grad(), model.routing(**choice):
            model(_ids(model))
        assert model.sparsity_stats()["module"] == 1.0
    assert model.routing_settings.policy is None  # restored
    with (
        pytest.raises(SkipGPTError, match="not both"),
        model.routing(override=never, policy=RandomPolicy(1.0)),
    ):
        pass
    with pytest.raises(SkipGPTError, match=r"execution 'slow'; accepted: \['fast', 'masked'\]"):
        with model.routing(execution="slow"):
            pass


@pytest.mark.parametrize("execution_name", ["fast", "masked"])
def test_removed_modules_never_run_and_count_as_skipped_and_dense_runs_them(execution_name):
    model, _ = routed("llama")
    apply_removal(model, [(1, "attn"), (2, "mlp")])
    calls = {"k_proj": 0, "mlp": 0}
    layers = model.routed_layers
    layers[1].part("attn").k_proj.register_forward_hook(
        lambda *a: calls.__setitem__("k_proj", calls["k_proj"] + 1)
    )
    layers[2].part("mlp").register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
    with torch.no_grad(), model.routing(execution=execution_name):
        model(_ids(model))
    assert calls == {"k_proj": 0, "mlp": 0}  # no query, no K/V, no MLP
    rates = model.sparsity_stats()["per_layer"]
    assert rates["attn"][1] == 1.0 and rates["mlp"][2] == 1.0 and rates["attn"][0] == 0.0
    policy = model.routing_settings.active_policy()
    assert policy.decide(layers[1], "attn", torch.zeros(1, 1, 64)) is REMOVED
    with torch.no_grad(), model.dense():  # the dense reference (and teacher) is the full base model
        model(_ids(model))
    assert calls == {"k_proj": 1, "mlp": 1}
    assert model.routing_settings.removed == {(1, "attn"), (2, "mlp")}  # and the removal is back after


@pytest.mark.parametrize("execution_name", ["fast", "masked"])
@pytest.mark.parametrize("substitutes", [False, True])
def test_static_policy_equals_constant_routers_and_runs_no_router(execution_name, substitutes):
    """Fixed pairs skip (to their substitutes, if any) for every token, the rest execute: the
    same logits as constant routers saying so, prefill and batch-1 decode, with no router run."""
    from skipgpt.baselines.llm_drop import set_static_routers

    extra = {"mlp_skip_to": "adapter", "substitute_rank": 4} if substitutes else {}
    model, _ = routed("llama", **extra)
    for p in model.parameters():  # random substitutes, so that running them shows
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    skipped = [(0, "mlp"), (2, "attn"), (3, "mlp")]
    set_static_routers(model, skipped)
    calls = []
    for layer in model.routed_layers:
        for router in layer.routers.values():
            router.register_forward_hook(lambda *a: calls.append(1))
    ids = _ids(model)
    with torch.no_grad(), model.routing(execution=execution_name):
        want = model(ids).logits
        want_step = model(ids[:1, :1]).logits
    calls.clear()
    with torch.no_grad(), model.routing(policy=StaticPolicy(skipped), execution=execution_name):
        got = model(ids).logits
        got_step = model(ids[:1, :1]).logits
    assert calls == []
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_step, want_step, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # nothing skipped: the dense model
        with model.dense():
            dense = model(ids).logits
        with model.routing(policy=StaticPolicy(), execution=execution_name):
            torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=1e-5)


# -- settings, scratch, statistics ---------------------------------------------------------------
def test_threshold_set_once_is_seen_by_inference_and_saved(tmp_path):
    model = _paper_model()
    ids = _ids(model, 2, 16)
    with torch.no_grad():
        model(ids)
        low = model.sparsity_stats()["module"]
        assert model.set_threshold(0.7) == 0.7
        model.reset_stats()
        model(ids)
    assert model.sparsity_stats()["module"] > low  # inference sees the new θ
    assert model.state.threshold == model.routing_settings.threshold == model.skipgpt_config.threshold == 0.7
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "skipgpt_config.json").read_text())
    assert saved["router_config"]["threshold"] == 0.7
    assert SkipGPTModel.from_pretrained(tmp_path / "m").routing_settings.threshold == 0.7
    loaded, _ = load_model(str(tmp_path / "m"), threshold=0.25)  # the same setter
    assert loaded.routing_settings.threshold == loaded.skipgpt_config.threshold == 0.25
    with pytest.raises(SkipGPTError, match="threshold must be in"):
        model.set_threshold(1.5)
    with model.routing(threshold=0.1):
        assert model.skipgpt_config.threshold == 0.1
    assert model.skipgpt_config.threshold == 0.7  # a temporary change is undone


def test_a_config_shared_by_two_models_keeps_each_models_threshold():
    config = SkipGPTConfig()
    a = get_skipgpt_model(routed("llama")[0].unwrap(), config)
    b = get_skipgpt_model(routed("llama")[0].unwrap(), config)
    a.set_threshold(0.9)
    assert b.routing_settings.threshold == 0.5 and config.threshold == 0.5


def test_scratch_is_per_forward_and_statistics_add_up_until_reset():
    model = _paper_model()
    ids = _ids(model, 2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        assert torch.equal(model.state.scratch.token_mask, mask.bool())
        first = dict(model.state.scratch.skip_rates)
        model(input_ids=ids)
    scratch, stats = model.state.scratch, model.routing_stats
    assert scratch.token_mask is None and set(scratch.skip_rates) == set(first)
    assert all(c == 13 + 16 for c in stats.counted.values())  # padding excluded, both forwards
    model.reset_stats()
    assert not model.routing_stats.counted and scratch.skip_rates  # the scratch is the last forward's
    with pytest.raises(AttributeError):
        model.state.skipped = {}  # statistics are recorded, never assigned


# -- executors -----------------------------------------------------------------------------------
def test_the_executor_is_chosen_once_per_layer_and_forward(monkeypatch):
    model, _ = routed("llama")
    chosen = []
    original = execution.choose_executor

    def spy(layer, hidden):
        chosen.append(original(layer, hidden))
        return chosen[-1]

    monkeypatch.setattr("skipgpt.layer.choose_executor", spy)
    n = model.state.num_layers
    with torch.no_grad():
        for setting, kind in (
            ({"execution": "fast"}, execution.SkippingExecutor),
            ({"execution": "masked"}, execution.ReferenceExecutor),
            ({"enabled": False}, execution.ReferenceExecutor),
        ):
            chosen.clear()
            with model.routing(**setting):
                model(_ids(model))
            assert len(chosen) == n and all(type(e) is kind for e in chosen), setting
    model.train()
    chosen.clear()
    model(_ids(model))
    assert all(type(e) is execution.ReferenceExecutor for e in chosen)


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_skipping_equals_reference_under_random_policy(rate):
    model, _ = routed("qwen3")
    ids = _ids(model, 2, 20)
    out = {}
    for name in ("fast", "masked"):
        with torch.no_grad(), model.routing(policy=RandomPolicy(rate, seed=5), execution=name):
            out[name] = model(ids).logits
    torch.testing.assert_close(out["fast"], out["masked"], rtol=1e-4, atol=1e-4)


# -- architectures -------------------------------------------------------------------------------
def test_one_call_registers_an_architecture(monkeypatch):
    monkeypatch.setattr(adapters, "ADAPTERS", dict(adapters.ADAPTERS))
    monkeypatch.setitem(fast.ATTENTION_PARTS, "ToyAttention", None)  # restored after the test
    parts = adapters.AttentionParts(q_norm="q_norm", k_norm="k_norm")
    adapters.register_architecture("toy", adapters.LLAMA_LIKE, "ToyAttention", parts)
    assert adapters.get_adapter("toy") is adapters.LLAMA_LIKE
    assert fast.ATTENTION_PARTS["ToyAttention"] is parts  # what the skipping kernel reads
    adapters.register_adapter("toy2", adapters.POST_NORMS)  # the old entry point still works
    assert adapters.get_adapter("toy2") is adapters.POST_NORMS


@pytest.mark.parametrize("norm", ["none", "rms"])
@pytest.mark.parametrize("router_hidden", [0, 8])
@pytest.mark.parametrize("count", [1, 2])
def test_margin_decision_equals_probability_at_threshold(router_hidden, count, norm):
    """``FusedRouters.execute`` (a sign test on the logit margin, no softmax) and its one-token
    form ``execute_one`` take the same decisions as ``p(execute) >= θ``, at every θ including 0
    and 1, and follow new weights; its probabilities are each router's own."""
    from skipgpt.router import FusedRouters, Router

    torch.manual_seed(0)
    routers = [Router(16, router_hidden, init="paper", norm=norm) for _ in range(count)]
    fused = FusedRouters(routers)
    x = torch.randn(3, 50, 16)
    scaled = x * torch.logspace(-2, 2, 50).view(1, 50, 1)  # token scales as far apart as a residual's
    own = torch.stack([r.execute_probability(scaled) for r in routers], -1)
    torch.testing.assert_close(fused.execute_probability(scaled), own, atol=1e-6, rtol=1e-5)
    for theta in (0.0, 0.1, 0.37, 0.5, 0.8, 0.99, 1.0):
        p = fused.execute_probability(x)
        got = fused.execute(x, theta)
        assert got.dtype == torch.bool and got.shape == p.shape
        # equal except where p sits within float rounding of θ
        differ = got != (p >= theta)
        assert not differ.any() or bool(((p[differ] - theta).abs() < 1e-6).all())
        # one token at a time, as Python bools (batch-1 decode): the same decisions
        one = torch.tensor([fused.execute_one(x[b, t], theta) for b in range(3) for t in range(50)])
        differ = one.view_as(got) != got
        assert not differ.any() or bool(((p[differ] - theta).abs() < 1e-6).all())
    assert 0 < int(fused.execute(x, 0.5).sum()) < x.shape[0] * x.shape[1] * count
    with torch.no_grad():
        routers[0].net[-1].bias.copy_(torch.tensor([0.0, -50.0]))  # the first router now always skips
    assert not fused.execute(x, 0.5)[..., 0].any()
    assert fused.execute_one(x[0, 0], 0.5)[0] is False


def test_rms_router_reads_the_direction_of_the_hidden_state():
    """``norm="rms"``: the logits of h and of c·h are equal (a residual's scale grows with depth);
    the raw router's are not; fused routers of mixed norms are refused."""
    from skipgpt.router import FusedRouters, Router

    torch.manual_seed(0)
    rms, raw = Router(16, 0, init="paper", norm="rms"), Router(16, 0, init="paper")
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(rms(h), rms(300.0 * h), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(raw(h), raw(300.0 * h), atol=1e-3)
    with pytest.raises(ValueError, match="alike"):
        FusedRouters([rms, raw])


def test_router_norm_config():
    """``router_norm`` accepts 'none'/'rms', refuses others in one line, and a saved config from
    before the field (no key) reads as 'none': its routers were trained on the raw state."""
    cfg = SkipGPTConfig(router_norm="rms")
    assert SkipGPTConfig.from_dict(cfg.to_dict()).router_norm == "rms"
    legacy = {k: v for k, v in SkipGPTConfig().to_dict().items() if k != "router_norm"}
    assert SkipGPTConfig.from_dict(legacy).router_norm == "none"
    with pytest.raises(SkipGPTError, match=r"router_norm must be one of \['none', 'rms'\]"):
        SkipGPTConfig(router_norm="layer")


def test_frozen_fused_routers_keep_their_weights_until_refreshed():
    """A server's ``FusedRouters(frozen=True)`` skips the per-call check for new weights, follows
    a new θ at once, and new weights after ``refresh()``."""
    from skipgpt.router import FusedRouters, Router

    torch.manual_seed(0)
    routers = [Router(16, 0, init="paper") for _ in range(2)]
    frozen, live = FusedRouters(routers, frozen=True), FusedRouters(routers)
    x = torch.randn(4, 16)
    assert torch.equal(frozen.execute(x, 0.5), live.execute(x, 0.5))
    assert torch.equal(frozen.execute(x, 0.9), live.execute(x, 0.9))  # θ is never stale
    before = frozen.execute(x, 0.5)
    with torch.no_grad():
        routers[0].net[-1].bias.copy_(torch.tensor([0.0, -50.0]))  # the first router now always skips
    assert not live.execute(x, 0.5)[:, 0].any()
    assert torch.equal(frozen.execute(x, 0.5), before)  # frozen: the weights it built
    frozen.refresh()
    assert torch.equal(frozen.execute(x, 0.5), live.execute(x, 0.5))
    assert frozen.execute_one(x[0], 0.5)[0] is False
