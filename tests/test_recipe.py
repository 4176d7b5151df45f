"""Recipe components: schedules, self-distillation, threshold calibration, parameter budget."""

from __future__ import annotations

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


def test_params_budget_regulariser_counts_module_sizes():
    model, _ = routed("llama", budget="params")
    attn_only = lambda i, m, h: torch.full(h.shape[:2], m != "attn")  # noqa: E731
    with model.routing(override=attn_only):
        model(random_ids(1, 8, model.config.vocab_size))
    attn = sum(v for (i, m), v in model.branch_params.items() if m == "attn")
    assert model.realised_sparsity().item() == pytest.approx(attn / sum(model.branch_params.values()))
    assert model.realised_sparsity("modules").item() == pytest.approx(0.5)
