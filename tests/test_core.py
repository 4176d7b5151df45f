"""Routed layers, router tuning, save/load and resume on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, interrupted_and_resumed, random_ids, routed, tiny

from skipgpt import SkipGPTConfig, SkipGPTError, SkipGPTModel, get_skipgpt_model
from skipgpt.baselines.random_routing import random_override
from skipgpt.train.loop import LoopArgs
from skipgpt.train.router_tuning import RouterTuningArgs, train_routers


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_init_equals_base_model(arch):
    base, _ = tiny(arch)
    ids = random_ids(2, 12, base.config.vocab_size)
    with torch.no_grad():
        ref = base(ids).logits
        model = get_skipgpt_model(base, SkipGPTConfig())
        out = model(ids).logits
    assert torch.equal(out, ref)
    assert model.sparsity_stats()["module"] == 0.0


@pytest.mark.parametrize("arch", ARCHS)
def test_only_routers_receive_gradients(arch):
    model, _ = routed(arch, router_init="paper")
    model.mark_only_routers_trainable()
    model.train()
    ids = random_ids(2, 16, model.config.vocab_size)
    out = model(input_ids=ids, labels=ids)
    (out.loss + 20 * (0.25 - model.realised_sparsity()).abs()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    router_names = {n for n, _ in model.named_parameters() if ".routers." in n}
    assert with_grad == router_names
    assert all(
        model.get_parameter(n).grad.abs().sum() > 0 for n in router_names if n.endswith("net.0.weight")
    )


def test_masked_gate_equals_skipping_by_hand(tiny_llama):
    """All-skip routing leaves the residual untouched: the model reduces to embed -> norm -> head."""
    base, _ = tiny_llama
    model = get_skipgpt_model(base, SkipGPTConfig())
    ids = random_ids(1, 8, base.config.vocab_size)
    never = lambda i, m, h: torch.zeros(h.shape[:2], dtype=torch.bool)  # noqa: E731
    with torch.no_grad(), model.routing(override=never, execution="masked"):
        out = model(ids).logits
        manual = base.lm_head(base.model.norm(base.model.embed_tokens(ids)))
    torch.testing.assert_close(out, manual)
    assert model.sparsity_stats()["module"] == 1.0


def test_padding_is_not_counted(tiny_llama):
    base, _ = tiny_llama
    model = get_skipgpt_model(base, SkipGPTConfig())
    ids = random_ids(2, 10, base.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of 4 tokens in row 0
    skip_pads = lambda i, m, h: model.state.token_mask.clone()  # noqa: E731  execute real tokens only
    with torch.no_grad(), model.routing(override=skip_pads):
        model(input_ids=ids, attention_mask=mask)
    assert model.sparsity_stats()["module"] == 0.0


def test_sparsity_stats_and_params_weighting(tiny_llama):
    base, _ = tiny_llama
    model = get_skipgpt_model(base, SkipGPTConfig())
    attn_only = lambda i, m, h: torch.full(h.shape[:2], m != "attn")  # noqa: E731 skip every attention
    with torch.no_grad(), model.routing(override=attn_only):
        model(random_ids(1, 8, base.config.vocab_size))
    s = model.sparsity_stats()
    attn_params = sum(v for (i, m), v in model.branch_params.items() if m == "attn")
    all_params = sum(model.branch_params.values())
    assert (s["attn"], s["mlp"], s["module"]) == (1.0, 0.0, 0.5)
    assert s["params"] == pytest.approx(attn_params / all_params)


def _train(model, blocks, out, steps, lr=1e-2, save_every=50, **tuning):
    """Stage 1 with the paper's loss (LM + regulariser, fixed target) unless ``tuning`` says
    otherwise: what these tests measure, without the default recipe's distillation and ramp."""
    loop = LoopArgs(max_steps=steps, batch_size=4, lr=lr, save_every=save_every)
    tuning = {"distill_weight": 0.0, "curriculum": 0.0, **tuning}
    return train_routers(model, blocks, out, loop, RouterTuningArgs(**tuning), progress=False)


def test_regulariser_moves_sparsity_to_target(tmp_path):
    model, _ = routed("llama", target_sparsity=0.5, sparsity_weight=20.0)
    blocks = random_ids(16, 32, model.config.vocab_size)
    with torch.no_grad():
        model(blocks[:4])
    start = model.sparsity_stats()["module"]
    # the default (linear) router's one layer moves from its +3 execute bias at this rate
    result = _train(model, blocks, tmp_path / "run", steps=40, lr=1e-1, calibrate_blocks=0)
    model.reset_stats()
    with torch.no_grad():
        model(blocks)
    end = model.sparsity_stats()["module"]
    trained = sum(h["sparsity"] for h in result["history"][-5:]) / 5  # sampled decisions, as trained
    assert start == 0.0
    assert abs(trained - 0.5) < 0.1, result["history"][-1]
    assert end > 0.15  # deterministic routing (θ = 0.5, uncalibrated) moved with it


def test_save_load_gives_identical_logits_and_routing(tmp_path):
    model, _ = routed("qwen2", router_init="paper")
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "skipgpt_config.json").read_text())
    assert saved["base_model"] == "random:qwen2" and saved["router_config"]["router_init"] == "paper"
    loaded = SkipGPTModel.from_pretrained(tmp_path / "m").eval()
    ids = random_ids(2, 12, model.config.vocab_size)
    with torch.no_grad():
        model.reset_stats()
        a = model(ids).logits
        loaded.reset_stats()
        b = loaded(ids).logits
    assert torch.equal(a, b)
    assert model.sparsity_stats() == loaded.sparsity_stats()
    assert 0.0 < model.sparsity_stats()["module"] < 1.0  # the paper init really routes


def test_resume_gives_the_same_next_step_loss(tmp_path):
    blocks = random_ids(12, 24, 259)
    full, _ = routed("llama", target_sparsity=0.3)
    loop = LoopArgs(max_steps=6, batch_size=4, lr=1e-2, save_every=3)
    # the default recipe: self-distillation and a curriculum, both replayed exactly on resume
    h_full = train_routers(full, blocks, tmp_path / "full", loop, progress=False)["history"]

    h_res = interrupted_and_resumed(blocks, tmp_path / "part", loop, target_sparsity=0.3)
    assert [h["step"] for h in h_res] == list(range(6))
    for a, b in zip(h_full[3:], h_res[3:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    ta = SkipGPTModel.from_pretrained(tmp_path / "full").router_state_dict()
    tb = SkipGPTModel.from_pretrained(tmp_path / "part").router_state_dict()
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_random_override_rate():
    model, _ = routed("llama")
    with torch.no_grad(), model.routing(override=random_override(0.4, seed=1)):
        model(random_ids(4, 64, model.config.vocab_size))
    assert abs(model.sparsity_stats()["module"] - 0.4) < 0.05


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 1, -0.1, "abc", float("nan")])
def test_bad_target_sparsity(value):
    with pytest.raises(SkipGPTError, match="target_sparsity"):
        SkipGPTConfig(target_sparsity=value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modules": "attn,ffn"}, "modules"),
        ({"router_init": "zeros"}, "router_init"),
        ({"budget": "flops"}, "budget"),
        ({"router_hidden": -1}, "router_hidden"),
        ({"threshold": 1.5}, "threshold"),
        ({"tau_start": 0}, "tau"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(SkipGPTError, match=match):
        SkipGPTConfig(**kwargs)


def test_config_json_rejects_unknown_keys():
    d = SkipGPTConfig().to_dict() | {"sparsity": 0.3}
    with pytest.raises(SkipGPTError, match="unknown SkipGPTConfig keys"):
        SkipGPTConfig.from_dict(d)


def test_unknown_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(SkipGPTError, match=r"'gpt2' is not supported; supported: .*llama"):
        get_skipgpt_model(gpt2, SkipGPTConfig())


def test_router_file_of_other_width_is_refused_with_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = routed("llama", router_hidden=None)  # d/4: 16 wide at d = 64, 8 at d = 32
    model.save_pretrained(tmp_path / "m")
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=259,
    )
    other = get_skipgpt_model(LlamaForCausalLM(cfg), SkipGPTConfig(router_hidden=None))
    with pytest.raises(SkipGPTError, match=r"does not fit this model: .*file \(16, 64\) vs model \(8, 32\)"):
        other.load_routers(tmp_path / "m" / "routers.safetensors")


def test_truncated_router_file_is_refused(tmp_path):
    model, _ = routed("llama")
    model.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "routers.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SkipGPTError, match="corrupt or truncated"):
        SkipGPTModel.from_pretrained(tmp_path / "m")


def test_foreign_output_dir_is_refused_and_untouched(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    model, _ = routed("llama")
    with pytest.raises(SkipGPTError, match="not a skipgpt folder"):
        model.save_pretrained(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]  # no temp files left
