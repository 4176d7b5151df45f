"""Next-token cross-entropy and the teacher's KL from one pass over the logits.

``shifted_lm_loss`` and the distillation loss each read the (B, T, V) logits into float32,
reduce them over the vocabulary and keep what their backward needs; on SmolLM2 (V = 49152) a
batch of 8×256 makes 400 MB per float32 copy, and the separate losses with their backward
passes cost seconds of a stage-1 step. ``lm_and_topk_kl`` (a cached teacher's top-k targets) and
``lm_and_kl`` (the live teacher's logits) compute both terms from row chunks of the logits (one
float32 chunk at a time), keep only per-row log-sum-exps, and write the gradient of both terms
in one pass:

* CE at temperature 1: ``d/dz = (softmax(z) - onehot(label)) / n_labels``;
* KL_k at temperature t over the teacher's k tokens S plus the tail (``teacher_cache`` docstring),
  with q = softmax(z/t), P_S/Q_S the teacher's/student's mass on S, P_tail = 1 - P_S,
  Q_tail = 1 - Q_S: ``dKL/du_j = q_j (P_S - P_tail Q_S / Q_tail)`` off S and that plus
  ``q_j P_tail / Q_tail - p_j`` on S (u = z/t); the loss's t² and the chain rule's 1/t give t;
* the full KL at temperature t (``losses.distillation_loss``): ``dKL/du = q - p``.

Both terms equal the separate functions' values and gradients (tests); the result is a (3,)
tensor (weighted loss, LM, KD) whose every component is differentiable.
"""

from __future__ import annotations

import torch

__all__ = ["lm_and_topk_kl", "lm_and_kl"]

CHUNK_ROWS = 256  # rows of the logits in float32 at a time (256 × 49152 × 4 B = 50 MB)


def _kd_parts(zt_chunk, values, indices, lse_teacher, lse_student, has_tail):
    """Per row of a chunk: the KL, p on S (k), q on S (k), and the gradient's two coefficients."""
    log_q = zt_chunk.gather(-1, indices) - lse_student.unsqueeze(-1)
    log_p = values - lse_teacher.unsqueeze(-1)
    p, q = log_p.exp(), log_q.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    p_s, q_s = p.sum(-1), q.sum(-1)
    if has_tail:
        p_tail = (1 - p_s).clamp_min(0)
        q_tail = (1 - q_s).clamp_min(torch.finfo(torch.float32).tiny)
        kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()
        ratio = p_tail / q_tail
    else:
        ratio = torch.zeros_like(p_s)
    return kl, p, q, p_s - ratio * q_s, ratio


class _TopKTeacher:
    """The teacher as the cache holds it (``TeacherTargets``), per row: top-k values / t, their
    ids, log-sum-exp / t."""

    def __init__(self, targets):
        k = targets.values.shape[-1]
        self.values, self.indices = targets.values.reshape(-1, k), targets.indices.reshape(-1, k)
        self.lse = targets.lse.reshape(-1)

    def _parts(self, sl, zt, lse_t):
        has_tail = self.indices.shape[-1] < zt.shape[-1]
        return _kd_parts(zt, self.values[sl], self.indices[sl], self.lse[sl], lse_t, has_tail)

    def kl(self, sl, zt, lse_t):
        return self._parts(sl, zt, lse_t)[0]

    def grad(self, sl, zt, qt, lse_t, scale, q_coeff):
        """``scale`` · dKL/du of the chunk's rows (u = z/t, qt = softmax(u)) + ``q_coeff`` · qt
        (q_coeff (rows, 1) or 0: what the caller adds on the same softmax, in the same product)."""
        _, p, q_s, c_out, ratio = self._parts(sl, zt, lse_t)
        g = qt * ((scale * c_out).unsqueeze(-1) + q_coeff)
        return g.scatter_add_(-1, self.indices[sl], scale * (q_s * ratio.unsqueeze(-1) - p))


class _LogitsTeacher:
    """The live teacher's logits (N, V), at temperature t."""

    def __init__(self, logits, t):
        self.logits, self.t = logits.reshape(-1, logits.shape[-1]), t

    def kl(self, sl, zt, lse_t):
        log_p = torch.log_softmax(self.logits[sl].float() / self.t, dim=-1)
        return (log_p.exp() * (log_p - zt + lse_t.unsqueeze(-1))).sum(-1)

    def grad(self, sl, zt, qt, lse_t, scale, q_coeff):
        g = torch.softmax(self.logits[sl].float() / self.t, dim=-1).mul_(-scale)  # -scale · p
        coeff = q_coeff + scale
        return g.addcmul_(qt, coeff) if torch.is_tensor(coeff) else g.add_(qt, alpha=coeff)


class _LMAndKL(torch.autograd.Function):
    """(3,): lm_weight·LM + kd_weight·KD, LM, KD, over row chunks of the logits; ``teacher`` (a
    ``_TopKTeacher`` or ``_LogitsTeacher``) gives a chunk's KL and its gradient."""

    @staticmethod
    def forward(ctx, logits, labels, teacher, lm_weight, kd_weight, t):
        rows, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        lse1 = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        lse_t = lse1 if t == 1.0 else torch.empty_like(lse1)
        ce_sum = torch.zeros((), dtype=torch.float64, device=rows.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=rows.device)
        valid = labels != -100
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            sl = slice(start, start + CHUNK_ROWS)
            z = rows[sl].float()
            lse1[sl] = torch.logsumexp(z, dim=-1)
            ce = lse1[sl] - z.gather(-1, labels[sl].clamp_min(0).unsqueeze(-1)).squeeze(-1)
            ce_sum += ce.masked_fill(~valid[sl], 0).sum(dtype=torch.float64)
            zt = z if t == 1.0 else z / t
            if t != 1.0:
                lse_t[sl] = torch.logsumexp(zt, dim=-1)
            kl_sum += teacher.kl(sl, zt, lse_t[sl]).sum(dtype=torch.float64)
        n_lm = max(int(valid.sum()), 1)
        lm = (ce_sum / n_lm).float()
        kd = (kl_sum / rows.shape[0]).float() * t * t
        ctx.save_for_backward(logits, labels, lse1, lse_t)
        ctx.teacher, ctx.consts = teacher, (lm_weight, kd_weight, t, n_lm)  # the teacher: constants
        return torch.stack([lm_weight * lm + kd_weight * kd, lm, kd])

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse1, lse_t = ctx.saved_tensors
        lm_weight, kd_weight, t, n_lm = ctx.consts
        g_lm = float(grad_out[0] * lm_weight + grad_out[1]) / n_lm
        g_kd = float(grad_out[0] * kd_weight + grad_out[2]) * t / labels.numel()  # t² · (1/t)
        rows = logits.reshape(-1, logits.shape[-1])
        grad = torch.empty_like(rows)
        valid = labels != -100
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            sl = slice(start, start + CHUNK_ROWS)
            z = rows[sl].float()
            q1 = (z - lse1[sl].unsqueeze(-1)).exp_()
            zt = z if t == 1.0 else z / t
            qt = q1 if t == 1.0 else (zt - lse_t[sl].unsqueeze(-1)).exp_()
            lm_scale = (g_lm * valid[sl].float()).unsqueeze(-1)
            if t == 1.0:  # one softmax: the CE's share joins the KL's product
                g = ctx.teacher.grad(sl, zt, q1, lse_t[sl], g_kd, lm_scale)
            else:
                g = ctx.teacher.grad(sl, zt, qt, lse_t[sl], g_kd, 0.0).addcmul_(q1, lm_scale)
            g.scatter_add_(-1, labels[sl].clamp_min(0).unsqueeze(-1), -lm_scale)
            grad[sl] = g
        return grad.view_as(logits), None, None, None, None, None


def _shifted_labels(input_ids):
    """(B, T) -> the next token of each position, -100 at the last."""
    return torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), -100)], dim=1)


def lm_and_kl(
    logits, input_ids, teacher_logits, lm_weight: float, kd_weight: float, temperature: float = 1.0
):
    """logits and teacher_logits (B, T, V), input_ids (B, T) -> (3,) float32 tensor:
    ``lm_weight·LM + kd_weight·KD``, LM (``losses.shifted_lm_loss``) and KD
    (``losses.distillation_loss`` at ``temperature``), no padding; the teacher gets no gradient."""
    t = float(temperature)
    teacher = _LogitsTeacher(teacher_logits.detach(), t)
    return _LMAndKL.apply(logits, _shifted_labels(input_ids), teacher, lm_weight, kd_weight, t)


def lm_and_topk_kl(logits, input_ids, teacher, lm_weight: float, kd_weight: float, temperature: float = 1.0):
    """logits (B, T, V), input_ids (B, T), ``TeacherTargets`` (B, T, k) -> (3,) float32 tensor:
    ``lm_weight·LM + kd_weight·KD``, LM (next-token cross-entropy, ``losses.shifted_lm_loss``)
    and KD (``teacher_cache.topk_distillation_loss`` at ``temperature``), no padding."""
    t = float(temperature)
    return _LMAndKL.apply(logits, _shifted_labels(input_ids), _TopKTeacher(teacher), lm_weight, kd_weight, t)
