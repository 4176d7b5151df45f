"""skipgpt frontier: points of every method, interpolation, same-run timing, resume (tiny models)."""

from __future__ import annotations

import copy
import json
import math
import statistics
import types

import pytest
from conftest import routed, tiny

import skipgpt.experiments.frontier as frontier
from skipgpt.baselines.shortgpt import remove_layers
from skipgpt.cli import main
from skipgpt.costs import CostModel
from skipgpt.eval import speed
from skipgpt.eval.speed import parse_scenario
from skipgpt.experiments.frontier import envelope, measure_speed, ppl_at, summarize


@pytest.fixture(autouse=True)
def _no_gc_before_runs(monkeypatch):
    """The timing collects garbage before every run (0.25 s each here); nothing here times real work."""
    monkeypatch.setattr(frontier, "gc", types.SimpleNamespace(collect=lambda: 0))


# -- interpolation ----------------------------------------------------------------------------------
def test_ppl_at_interpolates_on_the_monotone_envelope():
    # (speedup, ppl); (1.2, 40) is beaten by (1.3, 30): faster and better, so off the envelope
    curve = [(0.9, 10.0), (1.1, 20.0), (1.2, 40.0), (1.3, 30.0), (1.5, 80.0)]
    assert envelope(curve) == [(0.9, 10.0), (1.1, 20.0), (1.3, 30.0), (1.5, 80.0)]
    assert ppl_at(curve, 0.5) == 10.0  # below the slowest point: reached at that point's PPL
    assert ppl_at(curve, 1.1) == pytest.approx(20.0)
    # 1.2 lies halfway between (1.1, 20) and (1.3, 30): log-linear -> geometric mean
    assert ppl_at(curve, 1.2) == pytest.approx(math.sqrt(20.0 * 30.0))
    assert ppl_at(curve, 1.4) == pytest.approx(math.exp((math.log(30.0) + math.log(80.0)) / 2))
    assert ppl_at(curve, 1.5) == pytest.approx(80.0)
    assert ppl_at(curve, 1.51) is None  # the curve stops short: not reached
    assert ppl_at([], 1.0) is None
    assert ppl_at([(1.3, math.inf), (1.2, 5.0)], 1.25) is None  # a non-finite PPL is no point


def test_summarize_reads_each_line_at_the_targets():
    points = [
        {"method": "dense", "line": None, "speedup": {"a": 1.0}, "ppl": {"w": 10.0}},
        {"method": "shortgpt", "line": "shortgpt", "speedup": {"a": 1.1}, "ppl": {"w": 20.0}},
        {"method": "shortgpt", "line": "shortgpt", "speedup": {"a": 1.3}, "ppl": {"w": 40.0}},
        {"method": "skipgpt", "line": "skipgpt", "speedup": {"a": 1.2}, "ppl": {"w": 15.0}},
    ]
    out = summarize(points, ["a"], "w")
    assert set(out) == {"shortgpt", "skipgpt"}  # dense is on no line
    assert out["shortgpt"]["a"]["1.15"] == pytest.approx(math.exp(math.log(20) + 0.25 * math.log(2)), 1e-3)
    assert out["shortgpt"]["a"]["1.25"] == pytest.approx(math.exp(math.log(20) + 0.75 * math.log(2)), 1e-3)
    assert out["shortgpt"]["a"]["1.4"] is None
    assert out["skipgpt"]["a"] == {"1.15": 15.0, "1.25": None, "1.4": None}


def test_spread_order_covers_the_range_first():
    assert frontier.spread_order(8) == [7, 3, 1, 5, 0, 2, 4, 6]
    for n in range(13):
        assert sorted(frontier.spread_order(n)) == list(range(n))


# -- same-run timing ---------------------------------------------------------------------------------
def test_speedup_comes_from_dense_and_point_times_of_the_same_run(monkeypatch):
    """A fake clock advances only inside forwards: the point costs 1 per forward, the dense model
    1.5 + 0.1 per forward so far (a machine slowing down). Each point's speedup must be the ratio
    of the medians it recorded, with dense timings taken between its own."""
    clock = types.SimpleNamespace(now=0.0, dense_calls=0, log=[])
    monkeypatch.setattr(speed, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    dense, tok = tiny("llama")
    point = remove_layers(copy.deepcopy(dense), [1])

    def advance(name):
        def hook(module, args, kwargs):
            if name == "dense":
                clock.dense_calls += 1
                clock.now += 1.5 + 0.1 * clock.dense_calls
            else:
                clock.now += 1.0
            clock.log.append(name)

        return hook

    dense.register_forward_pre_hook(advance("dense"), with_kwargs=True)
    point.register_forward_pre_hook(advance("point"), with_kwargs=True)
    cost = CostModel.from_config(dense.config)
    scenarios = [parse_scenario("prefill_1x8"), parse_scenario("decode_b2_ctx4", decode_steps=3)]
    ids, _ = speed.token_pool(tok, 64, cost.vocab, 0, None)
    runners = {}
    first = measure_speed(dense, point, scenarios, ids, cost, removed=[(1, "attn"), (1, "mlp")], repeats=3,
                          warmup=1, dense_runners=runners)  # fmt: skip
    clock.log.clear()
    second = measure_speed(dense, point, scenarios, ids, cost, removed=[(1, "attn"), (1, "mlp")], repeats=3,
                           warmup=1, dense_runners=runners)  # fmt: skip
    for res in (first, second):
        for sc in scenarios:
            t = res["times_s"][sc.name]
            assert len(t["dense"]) == len(t["point"]) == 3
            per_run = 1.0 if sc.kind == "prefill" else sc.steps * 1.0
            assert t["point"] == pytest.approx([per_run] * 3)
            assert res["speedup"][sc.name] == pytest.approx(
                statistics.median(t["dense"]) / statistics.median(t["point"]), rel=1e-3
            )
            assert res["ideal"][sc.name] > 1.0
    # the dense model slowed down between the two points, and each speedup saw its own dense times
    for sc in scenarios:
        assert min(second["times_s"][sc.name]["dense"]) > max(first["times_s"][sc.name]["dense"])
        assert second["speedup"][sc.name] > first["speedup"][sc.name]


def test_decode_timing_alternates_step_by_step(monkeypatch):
    dense, tok = tiny("llama")
    model, _ = routed("llama")
    log = []
    dense.register_forward_pre_hook(lambda *a: log.append("d"))
    model.hf_model.register_forward_pre_hook(lambda *a: log.append("p"))
    cost = CostModel.from_config(dense.config)
    sc = parse_scenario("decode_b1_ctx4", decode_steps=4)
    ids, _ = speed.token_pool(tok, 16, cost.vocab, 0, None)
    with model.routing(threshold=0.5):
        res = measure_speed(dense, model, [sc], ids, cost, repeats=1, warmup=0)
    timed = log[2:10]  # after the two context prefills: one forward of each per step, in turns
    steps = [timed[i : i + 2] for i in range(0, 8, 2)]
    assert all(sorted(s) == ["d", "p"] for s in steps) and [s[0] for s in steps] == ["d", "p", "d", "p"]
    assert res["ideal"][sc.name] >= 1.0


# -- the command ------------------------------------------------------------------------------------
def _argv(tmp_path, out, *extra):
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(2000)))
    return [
        "frontier", "--model", "random:llama", "--out", str(out), "--dataset", str(text),
        "--eval-datasets", str(text), "--seq-len", "16", "--calib-blocks", "2", "--eval-seq-len", "32",
        "--max-windows", "1", "--scenarios", "prefill_1x8,decode_b2", "--decode-steps", "2",
        "--decode-context", "4", "--repeats", "1", "--warmup", "0", "--thetas", "0,0.6", "--max-layers", "2",
        *extra,
    ]  # fmt: skip


def _routers(tmp_path, name="r1", seed=0):
    model, _ = routed("llama", seed=seed)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def test_frontier_end_to_end_every_method(tmp_path, capsys):
    out = tmp_path / "fr"
    argv = _argv(tmp_path, out, "--max-steps", "1", "--batch-size", "2", "--calibrate-blocks", "2", "--json")
    assert main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads((out / "frontier.json").read_text())
    assert (out / "frontier.png").stat().st_size > 0 and "| point |" in (out / "frontier.md").read_text()
    keys = [(p["method"], p["label"]) for p in result["points"]]
    assert [m for m, _ in keys].count("skipgpt") == 2
    methods = [m for m, _ in keys]
    assert methods.count("shortgpt") == methods.count("llm-drop") == methods.count("substitute") == 2
    assert keys[0][0] == "dense" and result["complete"]
    assert [p["key"] for p in result["points"]] == [
        "dense", "skipgpt@0", "skipgpt@0.6", "shortgpt@1", "shortgpt@2", "llm-drop@1", "llm-drop@2",
        "substitute@1", "substitute@2",
    ]  # fmt: skip
    for p in result["points"]:
        assert set(p["speedup"]) == set(p["ideal"]) == {"prefill_1x8", "decode_b2"}
        assert set(p["sparsity"]) >= {"module", "params"} and list(p["ppl"]) == [str(tmp_path / "text.txt")]
        assert all(v > 0 for v in p["speedup"].values())
    shortgpt = [p for p in result["points"] if p["method"] == "shortgpt"]
    assert [len(p["removed_layers"]) for p in shortgpt] == [1, 2]
    drop = [p for p in result["points"] if p["method"] == "llm-drop"]
    assert [p["sparsity"]["params"] for p in drop] == pytest.approx(
        [p["sparsity"]["params"] for p in shortgpt], abs=0.2
    )
    subs = [p for p in result["points"] if p["method"] == "substitute"]
    for p, s in zip(subs, shortgpt, strict=True):  # MLPs only, net share near the layers' share
        assert p["sparsity"]["attn"] == 0 and p["sparsity"]["mlp"] == len(p["replaced_mlps"]) / 4
        assert p["sparsity"]["params_net"] == pytest.approx(s["sparsity"]["params"], abs=0.2)
        assert p["sparsity"]["params_net"] < p["sparsity"]["params"]
        # the substitutes' work is charged: the ideal is below removing the same MLPs
        assert 1 < p["ideal"]["prefill_1x8"]
    assert [len(p["replaced_mlps"]) for p in subs] == sorted(len(p["replaced_mlps"]) for p in subs)
    assert set(result["summary"]) == {"skipgpt", "shortgpt", "llm-drop", "substitute"}
    assert set(result["summary"]["shortgpt"]["decode_b2"]) == {"1.15", "1.25", "1.4"}
    assert last["summary"] == result["summary"] and (out / "models" / "skipgpt").is_dir()
    assert "Partial run" not in (out / "frontier.md").read_text()
    partial = result | {"complete": False, "planned": [*result["planned"], "shortgpt@3"]}
    assert (
        "Partial run: 9 of 10 points measured** (missing: shortgpt@3)"
        in frontier.format_frontier_markdown(partial)
    )


def test_resume_reuses_points_adds_router_sets_refuses_other_settings(tmp_path, monkeypatch):
    r1, r2, r3 = (_routers(tmp_path, f"r{i + 1}", i) for i in range(3))
    out = tmp_path / "fr"
    two = _argv(tmp_path, out, "--routers", str(r1), "--routers", str(r2))
    argv = [*two, "--routers", str(r3)]
    calls = []
    real = frontier.evaluate_quality
    monkeypatch.setattr(frontier, "evaluate_quality", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(two) == 0 and len(calls) == 1 + 2 * 2 + 2 + 2 + 2
    first = json.loads((out / "frontier.json").read_text())
    calls.clear()
    assert main(argv) == 0  # a router set added: only its points are measured
    result = json.loads((out / "frontier.json").read_text())
    assert len(calls) == 2 and len(result["points"]) == 1 + 3 * 2 + 2 + 2 + 2
    kept = {p["key"]: p for p in result["points"]}
    assert all(kept[p["key"]]["times_s"] == p["times_s"] for p in first["points"] if "times_s" in p)
    assert main(two) == 2  # a router set dropped: other settings, refused
    i = argv.index("--thetas") + 1
    more = [*argv[:i], argv[i] + ",0.9", *argv[i + 1 :]]
    calls.clear()
    assert main(more) == 0 and len(calls) == 3  # a θ added: one point per router set
    assert main(argv) == 2  # and dropped again: refused
    argv, result = more, json.loads((out / "frontier.json").read_text())
    assert len(result["points"]) == 1 + 3 * 3 + 2 + 2 + 2
    assert {p["line"] for p in result["points"] if p["method"] == "skipgpt"} == {
        "skipgpt:r1",
        "skipgpt:r2",
        "skipgpt:r3",
    }
    calls.clear()
    assert main(argv) == 0 and calls == []  # everything re-used
    progress = json.loads((out / frontier.PROGRESS_NAME).read_text())
    del progress["points"]["shortgpt@2"]
    (out / frontier.PROGRESS_NAME).write_text(json.dumps(progress))
    assert main(argv) == 0 and len(calls) == 1
    again = json.loads((out / "frontier.json").read_text())
    assert [p["key"] for p in again["points"]] == [p["key"] for p in result["points"]]
    # the runs are kept: a finished run re-read by their minimum recomputes nothing
    assert main([*argv, "--statistic", "min"]) == 0 and len(calls) == 1
    low = json.loads((out / "frontier.json").read_text())
    assert low["settings"]["statistic"] == "min"
    for p in low["points"][1:]:
        for name, t in p["times_s"].items():
            # speedups are stored to 4 decimals (a loaded machine can make one tiny)
            assert p["speedup"][name] == pytest.approx(min(t["dense"]) / min(t["point"]), rel=1e-3, abs=1e-4)
    calls.clear()
    other = [*argv, "--repeats", "2"]
    assert main(other) == 2 and calls == []  # other settings: refused in one line
    assert main([*other, "--overwrite"]) == 0 and len(calls) == len(result["points"])


def test_a_router_set_with_its_own_thetas(tmp_path, monkeypatch):
    """``--routers DIR@θs`` sweeps that set over its own θ values (the others over --thetas); they
    are part of the settings: adding such a set extends a run, changing its θs is refused."""
    r1, r2, r3 = (_routers(tmp_path, f"r{i + 1}", i) for i in range(3))
    out = tmp_path / "fr"
    two = _argv(tmp_path, out, "--routers", str(r1), "--routers", f"{r2}@0.3,0.65,0.7")
    assert main(two) == 0
    result = json.loads((out / "frontier.json").read_text())
    keys = [p["key"] for p in result["points"] if p["method"] == "skipgpt"]
    assert keys == ["skipgpt:r1@0", "skipgpt:r1@0.6", "skipgpt:r2@0.3", "skipgpt:r2@0.65", "skipgpt:r2@0.7"]
    assert [p["threshold"] for p in result["points"] if p.get("line") == "skipgpt:r2"] == [0.3, 0.65, 0.7]
    assert "its own θ values" in (out / "frontier.md").read_text()
    calls = []
    real = frontier.evaluate_quality
    monkeypatch.setattr(frontier, "evaluate_quality", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main([*two, "--routers", f"{r3}@0.5"]) == 0 and len(calls) == 1  # only the new set's point
    changed = _argv(
        tmp_path, out, "--routers", str(r1), "--routers", f"{r2}@0.3,0.7", "--routers", f"{r3}@0.5"
    )
    assert main(changed) == 2 and len(calls) == 1  # r2's θs changed: other settings, refused


@pytest.mark.parametrize(
    "extra",
    [
        ["--thetas", ""],
        ["--thetas", "0.5,1.5"],
        ["--max-layers", "0"],
        ["--repeats", "0"],
        ["--substitute-rank", "0"],
    ],
)
def test_bad_arguments_exit_2(tmp_path, extra):
    with pytest.raises(SystemExit) as e:
        main(_argv(tmp_path, tmp_path / "fr", *extra))
    assert e.value.code == 2


def test_bad_input_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "fr"
    assert main(_argv(tmp_path, out, "--max-layers", "4")) == 2  # the tiny model has 4 layers
    assert main(_argv(tmp_path, out, "--routers", str(tmp_path))) == 2  # not a router folder
    r1 = _routers(tmp_path)
    assert main(_argv(tmp_path, out, "--routers", str(r1), "--max-steps", "3")) == 2  # would be ignored
    assert main(_argv(tmp_path, out, "--scenarios", "prefill_bad")) == 2
    assert main(_argv(tmp_path, out, "--routers", str(r1), "--routers", str(r1))) == 2
    assert main(_argv(tmp_path, out, "--routers", str(r1), "--baselines", "shortgpt,mod")) == 2
    assert main(_argv(tmp_path, out, "--routers", f"{r1}@0.5,high")) == 2  # θs after '@' must parse
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 7 and all(line.startswith("error: ") for line in err)
    assert not (out / "frontier.json").exists()
