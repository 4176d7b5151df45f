"""Losses of router tuning: LM, sparsity regulariser, self-distillation; and their schedules."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..router import linear_schedule

__all__ = [
    "sparsity_penalty",
    "distillation_loss",
    "curriculum_target",
    "temperature_at",
    "shifted_lm_loss",
    "check_loss_weights",
]


def check_loss_weights(lm_weight: float, distill_weight: float, distill_temperature: float) -> None:
    """Refuse LM / self-distillation weights that leave no loss or make no sense."""
    from ..errors import SkipGPTError

    if lm_weight < 0 or distill_weight < 0:
        raise SkipGPTError(f"lm_weight and distill_weight must be >= 0, got {lm_weight} and {distill_weight}")
    if lm_weight == 0 and distill_weight == 0:
        raise SkipGPTError("at least one of lm_weight and distill_weight must be > 0")
    if distill_temperature <= 0:
        raise SkipGPTError(f"distill_temperature must be > 0, got {distill_temperature}")


def sparsity_penalty(realised: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """``weight * |target - realised|`` (the paper's regulariser, its weight called alpha there)."""
    return weight * (target - realised).abs()


def curriculum_target(
    target: float, step: int, max_steps: int, ramp_fraction: float, start: float = 0.0
) -> float:
    """Target sparsity at ``step``: ramps linearly from ``start`` (step 0; the share of modules
    removed for good, which no routing can undo) to ``target`` at ``ramp_fraction * max_steps``
    and stays there; ``ramp_fraction = 0`` is the fixed target."""
    ramp_steps = ramp_fraction * max_steps
    if ramp_steps <= 0:
        return target
    return start + (target - start) * min(step / ramp_steps, 1.0)


def temperature_at(tau_start: float, tau_end: float, step: int, max_steps: int) -> float:
    """Gumbel temperature annealed linearly from ``tau_start`` to ``tau_end`` over the run."""
    return linear_schedule(tau_start, tau_end, step, max_steps)


def shifted_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
):
    """Next-token cross-entropy. logits (B, T, V), input_ids (B, T) -> scalar, padding excluded."""
    labels = input_ids[:, 1:]
    logits = logits[:, :-1]
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over real tokens, times ``temperature**2``.

    logits: (B, T, V). Zero when the student equals the teacher. Computed and differentiated a
    block of tokens at a time (``_ChunkedKL``): no (B, T, V) temporary is allocated or kept for
    backward, which made this loss cost as much as the student's forward at a 49K vocabulary.
    """
    t = float(temperature)
    vocab = student_logits.shape[-1]
    weight = (
        torch.ones(student_logits.shape[:-1], device=student_logits.device)
        if attention_mask is None
        else attention_mask.to(device=student_logits.device, dtype=torch.float32)
    )
    total = _ChunkedKL.apply(
        student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab), weight.reshape(-1), t
    )
    return total / weight.sum().clamp_min(1.0) * t * t


class _ChunkedKL(torch.autograd.Function):
    """``sum_i w_i KL(softmax(teacher_i / t) || softmax(student_i / t))`` over the rows of (N, V)
    logits, a block of ``ROWS`` rows at a time, in fp32. Backward recomputes both softmaxes per
    block: d/d student_i = w_i (softmax(student_i / t) - softmax(teacher_i / t)) / t. The teacher
    gets no gradient (it is the dense model's output under ``no_grad``)."""

    ROWS = 128

    @staticmethod
    def forward(ctx, student, teacher, weight, t):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for i in range(0, student.shape[0], _ChunkedKL.ROWS):
            rows = slice(i, i + _ChunkedKL.ROWS)
            log_q = torch.log_softmax(student[rows].float() / t, dim=-1)
            log_p = torch.log_softmax(teacher[rows].float() / t, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            total += (kl * weight[rows]).sum()
        ctx.save_for_backward(student, teacher, weight)
        ctx.t = t
        return total

    @staticmethod
    def backward(ctx, grad_total):
        student, teacher, weight = ctx.saved_tensors
        t = ctx.t
        grad = torch.empty_like(student)
        for i in range(0, student.shape[0], _ChunkedKL.ROWS):
            rows = slice(i, i + _ChunkedKL.ROWS)
            q = torch.softmax(student[rows].float() / t, dim=-1)
            p = torch.softmax(teacher[rows].float() / t, dim=-1)
            scale = (weight[rows] * (grad_total / t)).unsqueeze(-1)
            grad[rows] = ((q - p) * scale).to(student.dtype)
        return grad, None, None, None
