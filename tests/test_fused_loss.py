"""``train.fused_loss`` against the two losses each function replaces (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from skipgpt.train import fused_loss
from skipgpt.train.fused_loss import lm_and_kl, lm_and_topk_kl
from skipgpt.train.losses import distillation_loss, shifted_lm_loss
from skipgpt.train.teacher_cache import teacher_targets, topk_distillation_loss


@pytest.mark.parametrize(
    ("vocab", "k", "temperature", "dtype"),
    [
        (50, 8, 1.0, torch.float32),
        (50, 8, 2.0, torch.float32),
        (50, 50, 1.0, torch.float32),  # no tail: the full KL
        (64, 5, 1.5, torch.bfloat16),
    ],
)
def test_equals_the_separate_losses_and_their_gradients(monkeypatch, vocab, k, temperature, dtype):
    monkeypatch.setattr(fused_loss, "CHUNK_ROWS", 7)  # several chunks, the last one short
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 6), generator=gen)
    teacher = teacher_targets(torch.randn(3, 6, vocab, generator=gen) * 2, k, temperature)
    logits = (torch.randn(3, 6, vocab, generator=gen) * 2).to(dtype).requires_grad_()

    loss, lm, kd = lm_and_topk_kl(logits, ids, teacher, 0.7, 1.3, temperature)
    (loss + 0.5 * lm - 0.25 * kd).backward()  # every output's gradient reaches the logits
    fused_grad, logits.grad = logits.grad.clone(), None

    ref_lm = shifted_lm_loss(logits, ids)
    ref_kd = topk_distillation_loss(logits, teacher, temperature)
    ref_loss = 0.7 * ref_lm + 1.3 * ref_kd
    (ref_loss + 0.5 * ref_lm - 0.25 * ref_kd).backward()

    for got, want in ((loss, ref_loss), (lm, ref_lm), (kd, ref_kd)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2e-3  # bf16: the gradient is rounded to the logits' dtype
    assert fused_grad.dtype == dtype
    torch.testing.assert_close(fused_grad.float(), logits.grad.float(), rtol=0, atol=tol)
    assert logits.grad.abs().max() > 10 * tol  # the comparison is not between zeros


@pytest.mark.parametrize(
    ("temperature", "dtype"), [(1.0, torch.float32), (2.0, torch.float32), (1.0, torch.bfloat16)]
)
def test_live_teacher_equals_the_separate_losses_and_their_gradients(monkeypatch, temperature, dtype):
    monkeypatch.setattr(fused_loss, "CHUNK_ROWS", 5)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, 7), generator=gen)
    teacher = (torch.randn(2, 7, 40, generator=gen) * 2).to(dtype)
    logits = (torch.randn(2, 7, 40, generator=gen) * 2).to(dtype).requires_grad_()

    loss, lm, kd = lm_and_kl(logits, ids, teacher, 0.6, 1.1, temperature)
    (loss - 0.3 * lm + 0.2 * kd).backward()
    fused_grad, logits.grad = logits.grad.clone(), None

    ref_lm, ref_kd = shifted_lm_loss(logits, ids), distillation_loss(logits, teacher, temperature)
    ref_loss = 0.6 * ref_lm + 1.1 * ref_kd
    (ref_loss - 0.3 * ref_lm + 0.2 * ref_kd).backward()

    for got, want in ((loss, ref_loss), (lm, ref_lm), (kd, ref_kd)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(fused_grad.float(), logits.grad.float(), rtol=0, atol=tol)
    assert logits.grad.abs().max() > 10 * tol


def test_loss_speed_benchmark_prints_its_table(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "loss_speed.py"
    spec = importlib.util.spec_from_file_location("loss_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "ls.md"
    argv = ["--batch-size", "2", "--seq-len", "8", "--vocab", "50", "--top-k", "5", "--repeats", "1"]
    threads = torch.get_num_threads()
    assert bench.main([*argv, "--threads", "2", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # later tests (bit-exact logits across processes) need theirs
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 6  # header + 5 variants, each timed
    assert all(float(cell) >= 0 for row in rows[1:] for cell in row.split("|")[2:5])
