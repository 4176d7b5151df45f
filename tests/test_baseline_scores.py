"""Baseline scores against independent computations on random models (non-zero values, real ranking).

* ShortGPT's Block Influence ``BI_l = 1 - mean cos(x_l, x_{l+1})`` over real tokens, recomputed
  from ``output_hidden_states=True`` (the last layer's output is the final norm's input: HF's
  last hidden state is already normed), with padding in the batch;
* MoD-D's top-k override executes, per sequence and module, the tokens with the HIGHEST router
  scores (the ranking, not only the count), never padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt.baselines.mod import topk_override
from skipgpt.baselines.scores import residual_similarities
from skipgpt.baselines.shortgpt import block_influence, shortgpt_prune


def _batch(vocab: int):
    ids = random_ids(3, 14, vocab, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    return ids, mask


def independent_block_influence(model, ids, mask) -> list[float]:
    """1 - mean over real tokens of cos(layer input, layer output), from the model's hidden states."""
    final_norm = model.model.norm
    seen = {}
    hook = final_norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("last", args[0]))
    try:
        with torch.no_grad():
            states = list(model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states)
    finally:
        hook.remove()
    n = model.config.num_hidden_layers
    assert len(states) == n + 1
    states[-1] = seen["last"]  # the last layer's output before the final norm
    real = mask.bool()
    bi = []
    for i in range(n):
        cos = F.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)  # (B, T)
        bi.append(1.0 - float(cos[real].mean()))
    return bi


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_block_influence_equals_an_independent_computation(arch):
    model, _ = tiny(arch)
    ids, mask = _batch(model.config.get_text_config(decoder=True).vocab_size)
    expected = independent_block_influence(model, ids, mask)
    got = block_influence(model, ids, attention_mask=mask, batch_size=2, progress=False)  # two batches
    assert got == pytest.approx(expected, abs=1e-5)
    assert all(b > 1e-3 for b in expected)  # a random model: no layer is the identity
    assert max(expected) - min(expected) > 1e-3  # distinct scores, so the ranking below means something
    # the padding is excluded: counting it would change the scores
    padded_too = independent_block_influence(model, ids, torch.ones_like(mask))
    assert max(abs(a - b) for a, b in zip(padded_too, expected, strict=True)) > 1e-4
    # ShortGPT removes the lowest-BI layer first
    n = model.config.num_hidden_layers
    record = shortgpt_prune(model, ids, 1 / n, attention_mask=mask, progress=False)
    assert record["removed_layers"] == [min(range(n), key=expected.__getitem__)]
    assert record["block_influence"] == pytest.approx(expected, abs=1e-5)


def test_attention_and_mlp_similarities_equal_an_independent_computation():
    """LLM-Drop's residual similarities: x_l -> h_l = x_l + attention branch -> x_{l+1}."""
    model, _ = tiny("llama")
    ids, mask = _batch(model.config.vocab_size)
    seen = {}

    def keep(key):
        def hook(module, args, kwargs, output=None):
            if output is None:  # pre-hook: the block input
                seen[key] = args[0] if args else kwargs["hidden_states"]
            else:
                seen[key] = output[0] if isinstance(output, tuple) else output

        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(keep((i, "x")), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(keep((i, "a")), with_kwargs=True))
        hooks.append(layer.register_forward_hook(keep((i, "y")), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    real = mask.bool()

    def cos(a, b):
        return float(F.cosine_similarity(a.double(), b.double(), dim=-1)[real].mean())

    sims = residual_similarities(model, ids, mask, batch_size=3, progress=False)
    for i in range(model.config.num_hidden_layers):
        x, y = seen[(i, "x")], seen[(i, "y")]
        h = x + seen[(i, "a")]  # llama: no post-attention norm
        assert sims["attn"][i] == pytest.approx(cos(x, h), abs=1e-5)
        assert sims["mlp"][i] == pytest.approx(cos(h, y), abs=1e-5)
        assert sims["block"][i] == pytest.approx(cos(x, y), abs=1e-5)
        assert sims["attn"][i] < 1 - 1e-4 and sims["mlp"][i] < 1 - 1e-4
    assert sims["tokens"] == int(mask.sum())


# -- MoD-D top-k ------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip_rate", [0.25, 0.6])
@pytest.mark.parametrize("grad", [False, True])
def test_mod_topk_executes_the_highest_scoring_tokens(skip_rate, grad):
    model, _ = tiny("llama")
    torch.manual_seed(0)
    routed = get_skipgpt_model(model, SkipGPTConfig(router_init="paper"), base_spec="random:llama")
    ids, mask = _batch(routed.config.vocab_size)
    override = topk_override(routed, skip_rate, straight_through=True)
    seen = []

    def spy(layer_idx, module, hidden):
        gate = override(layer_idx, module, hidden)
        with torch.no_grad():
            p = routed.routed_layers[layer_idx].execute_probability(module, hidden)
        seen.append((layer_idx, module, gate.detach(), p))
        return gate

    with torch.set_grad_enabled(grad), routed.routing(override=spy):
        routed(input_ids=ids, attention_mask=mask)
    assert len(seen) == 2 * routed.state.num_layers
    for layer_idx, module, gate, p in seen:
        executed = gate > 0.5
        # hard 0/1 values, up to the rounding of the straight-through hard + p - p.detach()
        torch.testing.assert_close(gate, executed.to(gate.dtype), atol=1e-6, rtol=0)
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            scores = p[b][real]
            n_real = int(real.sum())
            n_exec = n_real - round(n_real * skip_rate)
            assert not executed[b][~real].any(), (layer_idx, module, b)  # padding never executes
            assert int(executed[b].sum()) == n_exec
            best = set(scores.argsort(descending=True)[:n_exec].tolist())
            chosen = set(torch.nonzero(executed[b][real]).squeeze(-1).tolist())
            assert chosen == best, (layer_idx, module, b)  # the top scores, not any n_exec tokens
            ex, sk = scores[executed[b][real]], scores[~executed[b][real]]
            assert float(ex.min()) > float(sk.max()), (layer_idx, module, b)
    spread = torch.cat([p[mask.bool()] for *_, p in seen])
    assert float(spread.max() - spread.min()) > 0.05  # scores spread out: the ranking is a real one
