"""Recipe components: schedules, self-distillation, threshold calibration, parameter budget."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids, routed

from skipgpt.calibration import calibrate_threshold, weighted_quantile
from skipgpt.train.losses import curriculum_target, distillation_loss, temperature_at


def test_curriculum_is_exact_at_its_endpoints():
    assert curriculum_target(0.25, 0, 300, 0.3) == 0.0
    assert curriculum_target(0.25, 90, 300, 0.3) == 0.25
    assert curriculum_target(0.25, 299, 300, 0.3) == 0.25
    assert curriculum_target(0.25, 45, 300, 0.3) == pytest.approx(0.125)
    assert curriculum_target(0.25, 0, 300, 0.0) == 0.25  # no curriculum: fixed target


def test_temperature_anneals_from_start_to_end():
    assert temperature_at(5.0, 1.0, 0, 100) == 5.0
    assert temperature_at(5.0, 1.0, 99, 100) == 1.0
    assert temperature_at(5.0, 1.0, 500, 100) == 1.0


def test_distillation_is_zero_when_everything_executes():
    model, _ = routed("llama")  # dense init: every module executes at step 0
    ids = random_ids(2, 16, model.config.vocab_size)
    with torch.no_grad():
        with model.dense():
            teacher = model(ids).logits
        student = model(ids).logits
    assert model.sparsity_stats()["module"] == 0.0
    assert distillation_loss(student, teacher, temperature=2.0).item() == 0.0
    never = lambda i, m, h: torch.zeros(h.shape[:2], dtype=torch.bool)  # noqa: E731
    with torch.no_grad(), model.routing(override=never):
        assert distillation_loss(model(ids).logits, teacher).item() > 0.0


def _reference_kl(student, teacher, t, mask=None):
    """The plain formula: KL(teacher || student) per token, masked mean, times t²."""
    log_p = torch.log_softmax(teacher.float() / t, dim=-1)
    log_q = torch.log_softmax(student.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    m = torch.ones_like(kl) if mask is None else mask.float()
    return (kl * m).sum() / m.sum() * t * t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_distillation_equals_the_plain_formula_in_value_and_gradient(dtype, t, masked):
    """300 tokens (not a multiple of the 128-row block), a 500-token vocabulary."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 100, 500, generator=g) * 3
    student = (torch.randn(3, 100, 500, generator=g) * 3).to(dtype)
    mask = (torch.rand(3, 100, generator=g) > 0.3).long() if masked else None
    grads = []
    for loss_fn in (distillation_loss, _reference_kl):
        x = student.clone().requires_grad_(True)
        loss = loss_fn(x, teacher, t, mask)
        loss.backward()
        grads.append((loss.detach(), x.grad.float()))
    (value, grad), (ref_value, ref_grad) = grads
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # bf16: the gradient is rounded to the logits' dtype
    torch.testing.assert_close(grad, ref_grad, atol=tol, rtol=1e-2)
    if masked:  # padding gets no gradient
        assert grad[mask == 0].abs().max().item() == 0.0


def test_weighted_quantile():
    v = torch.tensor([0.9, 0.1, 0.5, 0.3])
    theta = weighted_quantile(v, torch.ones(4), 0.5)
    assert (v < theta).float().mean() == 0.5
    theta = weighted_quantile(v, torch.tensor([1.0, 1.0, 1.0, 7.0]), 0.7)  # 0.3 carries 70% of the weight
    assert 0.3 < theta <= 0.5 and not (v < theta)[2]


@pytest.mark.parametrize("budget", ["modules", "params"])
def test_calibrated_threshold_meets_the_target(budget):
    model, _ = routed("llama", router_init="paper", budget=budget)
    blocks = random_ids(8, 32, model.config.vocab_size)
    theta = calibrate_threshold(model, blocks, 0.3)
    model.reset_stats()
    with torch.no_grad():
        model(blocks)
    assert model.skipgpt_config.threshold == theta
    key = "module" if budget == "modules" else "params"
    assert model.sparsity_stats()[key] == pytest.approx(0.3, abs=0.03)


def test_calibration_bisects_when_the_quantile_fixed_point_misses(monkeypatch):
    import skipgpt.calibration as calibration

    model, _ = routed("llama", router_init="paper", budget="modules")
    blocks = random_ids(8, 32, model.config.vocab_size)
    monkeypatch.setattr(calibration, "weighted_quantile", lambda *a: 1.0)  # a fixed point that skips all
    theta = calibrate_threshold(model, blocks, 0.3, tolerance=0.02)
    model.reset_stats()
    with torch.no_grad():
        model(blocks)
    assert theta < 1.0 and model.sparsity_stats()["module"] == pytest.approx(0.3, abs=0.02)


def test_params_budget_regulariser_counts_module_sizes():
    model, _ = routed("llama", budget="params")
    attn_only = lambda i, m, h: torch.full(h.shape[:2], m != "attn")  # noqa: E731
    with model.routing(override=attn_only):
        model(random_ids(1, 8, model.config.vocab_size))
    attn = sum(v for (i, m), v in model.branch_params.items() if m == "attn")
    assert model.realised_sparsity().item() == pytest.approx(attn / sum(model.branch_params.values()))
    assert model.realised_sparsity("modules").item() == pytest.approx(0.5)


# --- benchmarks/recipe.py: resumable per variant -------------------------------------------------


def _load_recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "recipe.py"
    spec = importlib.util.spec_from_file_location("recipe_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_recipe(recipe, argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert recipe.main(argv) == 0
    return buf.getvalue()


TINY_RECIPE = [
    "--model", "random:llama", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
    "--eval-windows", "2", "--eval-seq-len", "64", "--save-every", "1",
]  # fmt: skip
TWO = "paper,dense-init"


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """benchmarks/recipe.py run once with two variants: (module, out folder, stdout)."""
    recipe = _load_recipe()
    out = tmp_path_factory.mktemp("recipe")
    text = _run_recipe(recipe, [*TINY_RECIPE, "--variants", TWO, "--out", str(out)])
    return recipe, out, text


def test_recipe_list_names_every_variant(tmp_path):
    recipe = _load_recipe()
    text = _run_recipe(recipe, ["--list", "--out", str(tmp_path)])
    assert [line.split(":")[0] for line in text.splitlines()] == list(recipe.VARIANTS)
    assert all("[not run;" in line for line in text.splitlines())
    assert not (tmp_path / "variants").exists()


def test_recipe_stores_each_variant_with_its_settings(recipe_run):
    recipe, out, _ = recipe_run
    result = json.loads((out / "recipe.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["dense", "paper", "dense-init"]
    dense, *variants = result["rows"]
    assert all(dense[k] == 0.0 for k in ("module", "attn", "mlp", "params"))
    for row in variants:
        for k in ("module", "attn", "mlp", "params"):
            assert 0.0 <= row[k] <= 1.0
        assert row["module"] > 0.0  # θ calibrated to the 0.25 target
        assert row["train s"] > 0 and row["wiki-heldout ppl"] > 1 and row["ptb ppl"] > 1
        assert set(row["sparsity by dataset"]) == {"wiki-heldout", "ptb"}
        assert {k: row[k] for k in ("module", "params")} == {
            k: row["sparsity by dataset"]["ptb"][k] for k in ("module", "params")
        }
    for name in ("dense", "paper", "dense-init"):
        record = json.loads((out / "variants" / f"{name}.json").read_text())
        assert record["row"]["variant"] == name
        assert record["settings"]["model"] == "random:llama"
    assert json.loads((out / "variants" / "paper.json").read_text())["settings"]["steps"] == 2
    assert not list((out / "variants").glob("*.progress.json"))  # finished variants leave no progress file
    md = (out / "recipe.md").read_text()
    assert md.splitlines()[0].startswith("| variant | module sp. | attn | mlp | param sp. |")
    assert "| dense | 0.000 | 0.000 | 0.000 | 0.000 |" in md
    assert result["settings"] in md
    listing = _run_recipe(recipe, [*TINY_RECIPE, "--list", "--out", str(out)])
    assert "paper: " in listing and "[stored;" in listing.splitlines()[0]


def test_recipe_rerun_skips_stored_variants_and_rebuilds_the_table(recipe_run, monkeypatch):
    recipe, out, _ = recipe_run
    md, js = (out / "recipe.md").read_text(), (out / "recipe.json").read_text()
    (out / "recipe.md").unlink()
    (out / "recipe.json").unlink()

    def forbidden(*a, **k):
        raise AssertionError("a stored row was recomputed")

    monkeypatch.setattr(recipe, "run_variant", forbidden)
    monkeypatch.setattr(recipe, "run_dense", forbidden)
    monkeypatch.setattr(recipe.Resources, "base", forbidden)  # not even the model is loaded
    text = _run_recipe(recipe, [*TINY_RECIPE, "--variants", TWO, "--out", str(out)])
    assert "paper: stored with these settings" in text and "dense-init: stored with these settings" in text
    assert "dense: stored with these settings, skipped" in text
    assert (out / "recipe.md").read_text() == md and (out / "recipe.json").read_text() == js
    # a subset run still shows every stored row of the same settings
    _run_recipe(recipe, [*TINY_RECIPE, "--variants", "paper", "--out", str(out)])
    assert (out / "recipe.md").read_text() == md
    # other settings: the stored rows are not theirs, so they would be recomputed
    with pytest.raises(AssertionError, match="recomputed"):
        _run_recipe(recipe, [*TINY_RECIPE, "--steps", "3", "--variants", "paper", "--out", str(out)])


def test_recipe_variant_interrupted_in_training_continues_from_its_checkpoint(recipe_run, monkeypatch):
    recipe, out, _ = recipe_run
    done = json.loads((out / "variants" / "dense-init.json").read_text())["row"]
    (out / "variants" / "dense-init.json").unlink()
    real = recipe.train_routers

    def interrupted(*args, on_step, **kwargs):
        def stop_after_first(step, metrics):
            on_step(step, metrics)
            raise KeyboardInterrupt  # after the checkpoint of step 1 (save_every 1)

        return real(*args, on_step=stop_after_first, **kwargs)

    monkeypatch.setattr(recipe, "train_routers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run_recipe(recipe, [*TINY_RECIPE, "--variants", "dense-init", "--out", str(out)])
    assert not (out / "variants" / "dense-init.json").exists()
    progress = json.loads((out / "variants" / "dense-init.progress.json").read_text())
    assert progress["step"] == 1
    monkeypatch.setattr(recipe, "train_routers", real)
    text = _run_recipe(recipe, [*TINY_RECIPE, "--variants", "dense-init", "--out", str(out)])
    assert "continuing from its checkpoint at step 1/2" in text
    row = json.loads((out / "variants" / "dense-init.json").read_text())["row"]
    assert row["resumed at step"] == 1
    for k in ("module", "attn", "mlp", "params", "threshold", "wiki-heldout ppl", "ptb ppl", "final lm"):
        assert row[k] == pytest.approx(done[k], rel=1e-5), k  # exact resume: the same routers
    assert not (out / "variants" / "dense-init.progress.json").exists()


def test_recipe_curve_evaluates_during_training_without_changing_it(recipe_run, tmp_path):
    recipe, out, _ = recipe_run
    plain = json.loads((out / "variants" / "dense-init.json").read_text())["row"]
    _run_recipe(
        recipe, [*TINY_RECIPE, "--variants", "dense-init", "--curve-every", "1", "--out", str(tmp_path)]
    )
    record = json.loads((tmp_path / "variants" / "dense-init.json").read_text())
    assert record["settings"]["curve_every"] == 1
    row = record["row"]
    assert [p["step"] for p in row["curve"]] == [1, 2]
    for k in ("module", "params", "threshold", "wiki-heldout ppl", "ptb ppl", "final lm"):
        assert row[k] == pytest.approx(plain[k], rel=1e-5), k  # the mid-run evaluation left training alone
    assert row["curve"][-1]["ptb ppl"] == row["ptb ppl"]
    assert all(p["ptb ppl"] > 1 and 0 <= p["module"] <= 1 for p in row["curve"])
    assert (tmp_path / "dense-init.curve.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "recipe.md").read_text()
    assert "PPL against router-tuning steps, dense-init" in md and "| step | module sp." in md


def test_recipe_curve_point_lost_by_a_stop_is_made_on_resume(recipe_run, tmp_path, monkeypatch):
    recipe, _, _ = recipe_run
    argv = [*TINY_RECIPE, "--variants", "dense-init", "--curve-every", "1"]
    _run_recipe(recipe, [*argv, "--out", str(tmp_path / "whole")])
    whole = json.loads((tmp_path / "whole" / "variants" / "dense-init.json").read_text())["row"]
    real = recipe.train_routers

    def stopped(*args, on_step, **kwargs):
        def stop(step, metrics):  # after the checkpoint of step 1, before its curve point
            raise KeyboardInterrupt

        return real(*args, on_step=stop, **kwargs)

    monkeypatch.setattr(recipe, "train_routers", stopped)
    with pytest.raises(KeyboardInterrupt):
        _run_recipe(recipe, [*argv, "--out", str(tmp_path / "split")])
    monkeypatch.setattr(recipe, "train_routers", real)
    text = _run_recipe(recipe, [*argv, "--out", str(tmp_path / "split")])
    assert "continuing from its checkpoint at step 1/2" in text
    split = json.loads((tmp_path / "split" / "variants" / "dense-init.json").read_text())["row"]
    assert [p["step"] for p in split["curve"]] == [1, 2]
    for a, b in zip(split["curve"], whole["curve"], strict=True):
        for k in ("module", "threshold", "ptb ppl", "wiki-heldout ppl"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), k


def test_cli_calibrate_meets_a_new_target_in_a_copy(tmp_path, capsys):
    from skipgpt.cli import main
    from skipgpt.data import load_blocks
    from skipgpt.eval.perplexity import evaluate_perplexity
    from skipgpt.loading import load_model

    model, _ = routed("llama", router_init="paper")
    src = model.save_pretrained(tmp_path / "routers", metadata={"stage": "router_tuning"})
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, again and again. " * 200)
    common = ["--dataset", str(text), "--seq-len", "32", "--blocks", "6", "--json"]
    for budget, target in (("modules", 0.4), ("params", 0.3)):
        out = tmp_path / f"cal-{budget}"
        argv = ["calibrate", "--model", str(src), "--target-sparsity", str(target), "--budget", budget]
        assert main(argv + ["--output", str(out), *common]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        key = "module" if budget == "modules" else "params"
        assert summary["sparsity_after"][key] == pytest.approx(target, abs=0.03)
        reloaded, tok = load_model(str(out))  # the copy routes at the new θ ...
        assert reloaded.state.threshold == pytest.approx(summary["threshold"])
        blocks = load_blocks(str(text), tok, 32, max_blocks=6)
        assert evaluate_perplexity(reloaded, blocks, progress=False)["sparsity"][key] == pytest.approx(
            summary["sparsity_after"][key]
        )
        record = json.loads((out / "skipgpt_config.json").read_text())["metadata"]
        assert record["stage"] == "router_tuning" and record["threshold_calibration"]["target"] == target
        assert (out / "routers.safetensors").read_bytes() == before["routers.safetensors"]  # ... same routers
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is untouched


def test_cli_calibrate_refuses_what_has_no_threshold(tmp_path, capsys):
    from skipgpt.cli import main

    model, _ = routed("llama")
    src = model.save_pretrained(tmp_path / "routers")
    drop = model.save_pretrained(tmp_path / "drop", metadata={"baseline": "llm-drop"})
    cases = [
        (
            ["--model", str(drop), "--output", str(tmp_path / "o")],
            "is LLM-Drop: it removes modules statically",
        ),
        (["--model", "random:llama", "--output", str(tmp_path / "o")], "is not a skipgpt output folder"),
        (["--model", str(src), "--output", str(src)], "--output must differ from --model"),
        (["--model", str(src), "--output", str(src.parent)], "is not a skipgpt folder"),
    ]
    for argv, match in cases:
        assert main(["calibrate", "--target-sparsity", "0.3", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drop", "routers"]  # nothing written
