"""Host synchronisations per forward (skipgpt.eval.syncs) and the device path of the fast execution.

The device path (what a GPU takes: one host read per layer, statistics on the device) is forced
on the CPU with ``fast.sync_policy("device")`` and must equal the masked reference and the host
path's statistics.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt.adapters import model_cache_argument
from skipgpt.eval.syncs import count_host_syncs
from skipgpt.fast import sync_policy

L = 3


def make_model(seed=0, **skipgpt):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=0,
    )
    model = get_skipgpt_model(AutoModelForCausalLM.from_config(config).eval(), SkipGPTConfig(**skipgpt))
    for layer in model.routed_layers:  # routers that skip about half the tokens
        for router in layer.routers.values():
            torch.nn.init.normal_(router.net[-1].weight, std=1.0)
            torch.nn.init.zeros_(router.net[-1].bias)
    return model


def random_routing(p_skip, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return lambda layer_idx, module, hidden: torch.rand(hidden.shape[:2], generator=gen) >= p_skip


def test_counter_sees_reads_and_data_dependent_shapes():
    x = torch.arange(6.0)
    with count_host_syncs() as log:
        x.sum().item()
        x.tolist()
        bool(x[0])
        int(x[1])
        float(x[2])
        x.nonzero()
        x[x > 2]
        host = x.cpu()
        host.tolist()  # a host copy: free
        (host + 1).sum().item()
        x + 1  # not a sync
    assert log.by_op() == {
        "item": 1,
        "tolist": 1,
        "bool": 1,
        "int": 1,
        "float": 1,
        "nonzero": 1,
        "bool_index": 1,
        "cpu": 1,
    }
    assert all("tests/test_syncs.py" in site for _, site in log.events)
    assert not hasattr(x, "_skipgpt_host_copy")  # the copy was tagged, never the original


def test_sync_policy_rejects_unknown():
    with pytest.raises(ValueError), sync_policy("sometimes"):
        pass


def decode(model, ids, mask, steps, cache_kind="dynamic"):
    arg = model_cache_argument(model)
    B, T = ids.shape
    cache = (
        DynamicCache(config=model.config)
        if cache_kind == "dynamic"
        else StaticCache(config=model.config, max_cache_len=T + steps)
    )
    g = torch.Generator().manual_seed(7)
    out = [model(input_ids=ids, attention_mask=mask, **{arg: cache}, use_cache=True).logits]
    for _ in range(steps):
        tok = torch.randint(1, 101, (B, 1), generator=g)
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        out.append(model(input_ids=tok, attention_mask=mask, **{arg: cache}, use_cache=True).logits)
    return torch.cat(out, 1), mask.bool(), [layer.keys.clone() for layer in cache.layers]


@pytest.mark.parametrize("routing", ["routers", "random"])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_device_path_equals_masked_and_host_stats(routing, B):
    model = make_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 101, (B, 11), generator=g)
    mask = torch.ones(B, 11, dtype=torch.long)
    if B > 1:
        mask[1, :4] = 0  # left padding
        ids = ids.masked_fill(mask == 0, 0)
    seen = {}
    for name, execution, policy in (
        ("masked", "masked", "host"),
        ("host", "fast", "host"),
        ("device", "fast", "device"),
    ):
        override = random_routing(0.5) if routing == "random" else None
        model.reset_stats()
        with torch.no_grad(), sync_policy(policy), model.routing(execution=execution, override=override):
            logits, real, keys = decode(model, ids, mask, 6)
            stats = (dict(model.state.skipped), dict(model.state.counted))
        seen[name] = (logits[real], keys, stats)
    for name in ("host", "device"):
        torch.testing.assert_close(seen[name][0], seen["masked"][0], atol=1e-5, rtol=0)
        for a, b in zip(seen[name][1], seen["masked"][1], strict=True):
            torch.testing.assert_close(a[:, :, -6:], b[:, :, -6:], atol=1e-5, rtol=0)
        assert seen[name][2] == seen["masked"][2]
    assert 0.2 < sum(seen["device"][2][0].values()) / sum(seen["device"][2][1].values()) < 0.8


def test_device_path_with_mlp_router_after_attention():
    """An MLP router reading the attention output decides later: two reads per layer, still exact."""
    model = make_model(mlp_router_input="post_attention")
    ids = torch.randint(1, 101, (4, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    outs = {}
    for execution, policy in (("masked", "host"), ("fast", "device")):
        with torch.no_grad(), sync_policy(policy), model.routing(execution=execution):
            outs[execution] = decode(model, ids, mask, 4)[0]
    torch.testing.assert_close(outs["fast"], outs["masked"], atol=1e-5, rtol=0)


def syncs_per_step(model, B, policy, routing):
    arg = model_cache_argument(model)
    ids = torch.randint(1, 101, (B, 18), generator=torch.Generator().manual_seed(3))
    cache = StaticCache(config=model.config, max_cache_len=18)
    override = random_routing(0.4) if routing == "random" else None
    with torch.no_grad(), sync_policy(policy), model.routing(execution="fast", override=override):
        with count_host_syncs() as pre:
            model(input_ids=ids[:, :16], **{arg: cache}, use_cache=True)
        model(input_ids=ids[:, 16:17], **{arg: cache}, use_cache=True)
        with count_host_syncs() as step:
            model(input_ids=ids[:, 17:], **{arg: cache}, use_cache=True)
        stats = model.state.skipped  # reading the statistics is where the device counts come back
    assert stats
    return pre.count("skipgpt/"), step.count("skipgpt/")


@pytest.mark.parametrize("routing", ["routers", "random"])
@pytest.mark.parametrize("B", [1, 8])
def test_device_path_reads_the_host_once_per_layer(routing, B):
    model = make_model()
    assert syncs_per_step(model, B, "device", routing) == (L, L)
    pre, step = syncs_per_step(model, B, "host", routing)  # the CPU's path reads where it needs
    assert step >= L and pre > L
