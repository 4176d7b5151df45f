"""Baselines: ShortGPT, LLM-Drop, MoD-D, budget matching, and the compare command (tiny models)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ARCHS, cache_kwargs, random_ids, tiny

from skipgpt.baselines.llm_drop import build_llm_drop, llm_drop_prune, module_importance, save_llm_drop
from skipgpt.baselines.mod import topk_override, topk_routing, train_mod
from skipgpt.baselines.scores import branch_param_counts, residual_similarities, select_by_budget
from skipgpt.baselines.shortgpt import (
    RECORD_NAME,
    block_influence,
    remove_layers,
    save_pruned,
    shortgpt_prune,
)
from skipgpt.cli import main
from skipgpt.errors import SkipGPTError
from skipgpt.model import SkipGPTModel


def _vocab(model) -> int:
    return model.config.vocab_size


def _blocks(model, n=4, t=24, seed=0):
    return random_ids(n, t, _vocab(model), seed=seed)


def _zero(model, layer: int, module: str) -> None:
    """Make a branch output zero: attention o_proj / MLP down_proj weights (and biases) = 0."""
    lay = model.model.layers[layer]
    proj = lay.self_attn.o_proj if module == "attn" else lay.mlp.down_proj
    with torch.no_grad():
        for p in proj.parameters():
            p.zero_()


def _greedy(model, ids, steps):
    for _ in range(steps):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


# -- scores -----------------------------------------------------------------------------------------
def test_identity_layer_has_zero_block_influence_and_goes_first():
    model, _ = tiny("llama")
    n = model.config.num_hidden_layers
    _zero(model, 1, "attn")
    _zero(model, 1, "mlp")
    bi = block_influence(model, _blocks(model), progress=False)
    assert len(bi) == n
    assert abs(bi[1]) < 1e-6
    assert all(b > 1e-4 for i, b in enumerate(bi) if i != 1)
    record = shortgpt_prune(model, _blocks(model), 1 / n, progress=False)
    assert record["removed_layers"] == [1]
    assert record["sparsity"]["params"] == pytest.approx(1 / n)


def test_module_scores_zero_for_identity_branches():
    model, _ = tiny("llama")
    _zero(model, 0, "attn")
    _zero(model, 2, "mlp")
    scores = module_importance(model, _blocks(model), progress=False)
    assert abs(scores[(0, "attn")]) < 1e-6 and abs(scores[(2, "mlp")]) < 1e-6
    others = [v for k, v in scores.items() if k not in {(0, "attn"), (2, "mlp")}]
    assert min(others) > 1e-5


def test_similarities_exclude_padding():
    model, _ = tiny("llama")
    ids = _blocks(model, n=2, t=20)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0  # right padding: the real tokens' states equal those of the cut sequence
    padded = residual_similarities(model, ids, mask, progress=False)
    cut = residual_similarities(model, ids[:, :12], progress=False)
    assert padded["tokens"] == cut["tokens"] == 24
    for k in ("block", "attn", "mlp"):
        assert padded[k] == pytest.approx(cut[k], abs=1e-5)


# -- ShortGPT ---------------------------------------------------------------------------------------
def test_removed_layers_are_gone_and_model_equals_skipping_them(tmp_path):
    from skipgpt.loading import load_model

    model, tok = tiny("llama")
    ref = copy.deepcopy(model)
    n = model.config.num_hidden_layers
    drop = [1, n - 1]
    remove_layers(model, drop)
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers == n - 2
    assert all(not any(layer is r for r in layers) for i, layer in enumerate(ref.model.layers) if i in drop)
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(n - 2))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in ref.parameters())

    # the pruned model = the original with those layers made identity
    def identity(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    hooks = [ref.model.layers[i].register_forward_hook(identity, with_kwargs=True) for i in drop]
    ids = _blocks(model, n=2, t=16)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        out = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)  # KV cache of renumbered layers
    for h in hooks:
        h.remove()
    assert out.tolist() == _greedy(model, ids[:1, :6], 6).tolist()

    record = {"method": "shortgpt", "removed_layers": drop, "target_sparsity": 0.5}
    save_pruned(model, tok, tmp_path / "sg", record)
    assert json.loads((tmp_path / "sg" / RECORD_NAME).read_text())["removed_layers"] == drop
    loaded, _ = load_model(str(tmp_path / "sg"))
    assert loaded.config.num_hidden_layers == n - 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# -- budget matching --------------------------------------------------------------------------------
def test_budget_matching_exact_to_one_unit():
    gen = torch.Generator().manual_seed(0)
    params = {(i, m): (100 if m == "attn" else 500) for i in range(8) for m in ("attn", "mlp")}
    total = sum(params.values())
    scores = {k: float(torch.rand((), generator=gen)) for k in params}
    for target in (0.05, 0.1, 0.25, 0.4, 0.6):
        removed, share = select_by_budget(scores, params, target, total)
        order = sorted(scores, key=scores.get)
        assert removed == order[: len(removed)]  # lowest scores first
        boundary = params[order[len(removed)]] if share < target else params[removed[-1]]
        assert abs(share - target) <= boundary / total / 2 + 1e-12  # nearest: within half the boundary unit
        down = select_by_budget(scores, params, target, total, rounding="down")[1]
        up = select_by_budget(scores, params, target, total, rounding="up")[1]
        assert down <= target <= up and down <= share <= up


def test_exact_tie_goes_to_fewer_removals():
    params = {i: 3_200_001 for i in range(30)}  # 30 equal layers, target 7.5 layers
    removed, share = select_by_budget({i: 0.1 * i for i in range(30)}, params, 0.25, sum(params.values()))
    assert len(removed) == 7 and share == pytest.approx(7 / 30)


def test_budget_of_real_model_counts_attention_and_mlp_parameters():
    model, _ = tiny("llama")
    n = model.config.num_hidden_layers
    params = branch_param_counts(model)
    layer = model.model.layers[0]
    attn = sum(p.numel() for p in layer.self_attn.parameters()) + layer.input_layernorm.weight.numel()
    assert params[(0, "attn")] == attn
    record = shortgpt_prune(model, _blocks(model), 0.5, progress=False)
    k = len(record["removed_layers"])
    assert k == round(0.5 * n)
    assert record["sparsity"]["params"] == pytest.approx(k / n)


@pytest.mark.parametrize("sparsity, message", [(0.99, "remove all"), (0.001, "removing no")])
def test_impossible_budgets_rejected(sparsity, message):
    model, _ = tiny("llama")
    with pytest.raises(SkipGPTError, match=message):
        shortgpt_prune(model, _blocks(model), sparsity, progress=False)
    with pytest.raises(SkipGPTError, match=message):
        llm_drop_prune(model, _blocks(model), sparsity if sparsity < 0.5 else 0.9999, progress=False)


def test_cli_rejects_sparsity_leaving_no_layers(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["baseline", "shortgpt", "--model", "random:llama", "--sparsity", "0.99", "--output", str(out)]
    assert main(argv + ["--seq-len", "16", "--calib-blocks", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: sparsity 0.99 would remove all 4 layers")
    assert not out.exists()
    with pytest.raises(SystemExit) as e:  # outside (0, 1): argparse refuses before any work
        main(["baseline", "llm-drop", "--model", "random:llama", "--sparsity", "1.5", "--output", str(out)])
    assert e.value.code == 2 and not out.exists()


def test_eval_ppl_of_a_shortgpt_folder_reports_its_removed_share(tmp_path, capsys):
    out = tmp_path / "sg"
    argv = ["baseline", "shortgpt", "--model", "random:llama", "--sparsity", "0.25", "--output", str(out)]
    assert main(argv + ["--seq-len", "16", "--calib-blocks", "2", "--json"]) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert (
        main(["eval", "ppl", "--model", str(out), "--dataset", str(text), "--seq-len", "32", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["static"] is True
    assert result["sparsity"] == built["sparsity"] and result["sparsity"]["params"] == 0.25


# -- LLM-Drop ---------------------------------------------------------------------------------------
def test_llm_drop_removes_identity_modules_first_and_roundtrips(tmp_path):
    from skipgpt.loading import load_model

    model, _ = tiny("llama")
    _zero(model, 0, "attn")  # layer 0's attention: its cache slot goes, generation must still work
    _zero(model, 2, "mlp")
    ref = copy.deepcopy(model)
    params = branch_param_counts(model)
    target = (params[(0, "attn")] + params[(2, "mlp")]) / sum(params.values())
    routed, record = llm_drop_prune(model, _blocks(model), target, base_spec="random:llama", progress=False)
    assert {tuple(x) for x in record["removed_modules"]} == {(0, "attn"), (2, "mlp")}
    assert record["sparsity"]["params"] == pytest.approx(target)
    ids = _blocks(ref, n=2, t=16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(routed(input_ids=ids).logits, ref(input_ids=ids).logits)
        routed.reset_stats()
        routed(input_ids=ids)
        assert routed.sparsity_stats()["params"] == pytest.approx(target)
        gen = routed.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    assert gen.tolist() == _greedy(routed, ids[:1, :5], 6).tolist()
    assert routed.routed_layers[0].part("attn").layer_idx != 0  # its cache slot was given away

    save_llm_drop(routed, tmp_path / "ld", record)
    loaded, _ = load_model(str(tmp_path / "ld"))
    assert isinstance(loaded, SkipGPTModel) and loaded.state.removed == {(0, "attn"), (2, "mlp")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_dropped_attention_writes_no_kv_cache():
    from transformers import DynamicCache

    model, _ = tiny("llama")
    n = model.config.num_hidden_layers
    routed = build_llm_drop(model, [(1, "attn"), (2, "mlp")], base_spec="random:llama")
    cache = DynamicCache(config=routed.config)
    ids = _blocks(routed, n=1, t=8)
    with torch.no_grad():
        routed(input_ids=ids, **cache_kwargs(routed, cache))
    filled = [layer.keys is not None and layer.keys.numel() > 0 for layer in cache.layers]
    assert sum(filled) == n - 1


# -- MoD-D ------------------------------------------------------------------------------------------
def test_topk_executes_exact_capacity_per_sequence_and_ignores_padding():
    from skipgpt import SkipGPTConfig, get_skipgpt_model

    model, _ = tiny("llama")
    routed = get_skipgpt_model(model, SkipGPTConfig(router_init="paper"), base_spec="random:llama")
    ids = _blocks(routed, n=2, t=20)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0  # left padding: 12 real tokens
    decisions = []
    override = topk_override(routed, 0.25, straight_through=False)

    def spy(i, m, h):
        g = override(i, m, h)
        decisions.append(g)
        return g

    with torch.no_grad(), routed.routing(override=spy):
        routed(input_ids=ids, attention_mask=mask)
    for g in decisions:
        assert g[0].sum() == 15 and g[1].sum() == 9 and not g[1, :8].any()


def test_mod_trains_routers_and_saves(tmp_path):
    from skipgpt.loading import load_model
    from skipgpt.train.loop import LoopArgs
    from skipgpt.train.router_tuning import RouterTuningArgs

    model, _ = tiny("llama")
    blocks = _blocks(model, n=8, t=16)
    routed, result = train_mod(
        model,
        blocks,
        0.25,
        tmp_path / "mod",
        LoopArgs(max_steps=2, batch_size=4, save_every=2),
        RouterTuningArgs(calibrate_blocks=4),
        base_spec="random:llama",
        progress=False,
    )
    assert all(h["sparsity"] == pytest.approx(0.25, abs=0.02) for h in result["history"])
    # the last layer of each router (dense init: all zeros before training)
    last = [r.net[-1].weight for layer in routed.routed_layers for r in layer.routers.values()]
    assert (
        sum(float(p.detach().abs().sum()) for p in last) > 0
    )  # the straight-through gradient reached the routers
    loaded, _ = load_model(str(tmp_path / "mod"))
    assert loaded.metadata["baseline"] == "mod-d" and 0 < loaded.state.threshold < 1
    calibration = loaded.metadata["threshold_calibration"]  # the causal variant meets the budget
    assert calibration["threshold"] == pytest.approx(loaded.state.threshold)
    assert calibration["budget"] == "params" and calibration["blocks"] == 4
    assert calibration["sparsity_after"]["params"] == pytest.approx(0.25, abs=0.05)
    loaded.reset_stats()
    with torch.no_grad(), topk_routing(loaded):
        loaded(input_ids=blocks[:2])
    assert loaded.sparsity_stats()["params"] == pytest.approx(0.25)


# -- compare ----------------------------------------------------------------------------------------
def test_compare_end_to_end(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(3000)))
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "random:llama", "--sparsity", "0.25", "--out", str(out), "--json"]
    argv += ["--dataset", str(text), "--eval-datasets", str(text), "--seq-len", "16", "--max-blocks", "8"]
    argv += ["--max-steps", "1", "--batch-size", "2", "--calib-blocks", "2", "--calibrate-blocks", "2"]
    argv += ["--eval-seq-len", "32", "--max-windows", "1", "--speed-tokens", "16", "--speed-repeats", "1"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads((out / "compare.json").read_text())
    assert result["complete"] and (out / "compare.md").read_text().count("\n|") >= 7
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["dense", "skipgpt", "shortgpt", "llm-drop", "mod", "mod-causal"]
    for row in result["rows"]:
        assert set(row["sparsity"]) >= {"module", "attn", "mlp", "params"} and row["ppl"][str(text)] > 0
        assert row["speed"]["prefill_tok_s"] > 0
    assert [r["method"] for r in summary["rows"]] == methods
    # a second run with another budget into the same folder is refused, not mixed
    assert main([*argv[:4], "0.5", *argv[5:]]) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_prunes_and_generates(arch):
    model, _ = tiny(arch)
    ref = copy.deepcopy(model)
    ids = _blocks(model, n=1, t=8)
    remove_layers(model, [1])
    assert len(model.model.layers) == model.config.num_hidden_layers
    with torch.no_grad():
        assert (
            model.generate(ids, max_new_tokens=4, do_sample=False).tolist() == _greedy(model, ids, 4).tolist()
        )
        routed = build_llm_drop(ref, [(0, "attn"), (1, "mlp")], base_spec=f"random:{arch}")
        gen = routed.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.tolist() == _greedy(routed, ids, 4).tolist()


def test_tables_write_huge_perplexities_in_three_significant_digits():
    from skipgpt.eval.tables import markdown_table

    rows = [{"ppl": 1.8125091201551643e47}, {"ppl": 42.30721}, {"ppl": 1.23456}, {"ppl": 999999.0}]
    body = markdown_table(rows, [("PPL", "ppl")]).splitlines()[2:]
    assert body == ["| 1.81e+47 |", "| 42.31 |", "| 1.235 |", "| 999999.00 |"]
