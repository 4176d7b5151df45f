"""What a training step of either stage computes: the task loss (LM and self-distillation from
the dense model) and the per-module skip rates it reports.

Shared by stage 1 (``router_tuning``), stage 2 and SkipGPT-Joint (``lora``), so that neither of
those imports the other for it. The teacher of self-distillation is the model itself with every
module executing and its LoRA adapter, if one is attached, switched off.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from ..errors import SkipGPTError
from ..lora_adapter import get_peft
from ..model import SkipGPTModel
from .losses import distillation_loss, shifted_lm_loss

__all__ = ["dense_teacher", "lm_and_distillation", "module_rates"]


def dense_teacher(model: torch.nn.Module) -> ExitStack:
    """Context in which ``model`` is its own distillation teacher: the frozen base model, every
    module executing (routing off) and LoRA, if attached, switched off."""
    stack = ExitStack()
    if isinstance(model, SkipGPTModel):
        stack.enter_context(model.dense())
    peft_model = get_peft(model)
    if peft_model is not None:
        stack.enter_context(peft_model.disable_adapter())
    return stack


# LM and the teacher's KL (live, or the cache's top-k) from one pass over the logits
# (``train.fused_loss``); False computes the two losses separately (``benchmarks/train_throughput.py``
# times both). Inputs with an attention mask (padding) always take the separate losses.
FUSED_LOSSES = True


def lm_and_distillation(
    model, forward, input_ids: torch.Tensor, weights, *, teacher_cache=None, **forward_kwargs
):
    """One student forward (after a teacher forward in ``dense_teacher`` when distilling).

    ``input_ids``: (B, T). ``weights`` has ``lm_weight``, ``distill_weight`` and
    ``distill_temperature`` (the stage-1 or stage-2 args). Returns ``(loss, metrics)``:
    ``lm_weight·LM + distill_weight·KD`` (0.0 when both terms are off) and the terms' values
    under ``lm`` / ``kd``. With a ``teacher_cache`` (``train.teacher_cache.TeacherCache``) the
    teacher runs only for blocks it has not seen, under ``inference_mode``, and KD is the top-k
    KL (``topk_distillation_loss``). Without padding both terms come from one pass over the logits
    (``train.fused_loss``).
    """
    teacher = None
    if weights.distill_weight > 0 and teacher_cache is not None:
        if forward_kwargs:
            raise SkipGPTError(
                f"the teacher cache keys blocks by token ids only; got {sorted(forward_kwargs)}"
            )

        def teacher_logits(ids: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), dense_teacher(model):
                return forward(input_ids=ids).logits

        teacher = teacher_cache.targets(input_ids, teacher_logits)
    elif weights.distill_weight > 0:
        with torch.no_grad(), dense_teacher(model):
            teacher = forward(input_ids=input_ids, **forward_kwargs).logits
    logits = forward(input_ids=input_ids, **forward_kwargs).logits
    if teacher is not None and FUSED_LOSSES and not forward_kwargs:  # one pass over the logits
        from .fused_loss import lm_and_kl, lm_and_topk_kl

        w = weights
        fused = lm_and_topk_kl if teacher_cache is not None else lm_and_kl
        loss, lm, kd = fused(logits, input_ids, teacher, w.lm_weight, w.distill_weight, w.distill_temperature)
        metrics = {"lm": float(lm.detach())} if w.lm_weight > 0 else {}
        return loss, {**metrics, "kd": float(kd.detach())}
    loss, metrics = 0.0, {}
    if weights.lm_weight > 0:
        lm = shifted_lm_loss(logits, input_ids)
        loss = loss + weights.lm_weight * lm
        metrics["lm"] = float(lm.detach())
    if teacher is not None:
        if teacher_cache is not None:
            from .teacher_cache import topk_distillation_loss

            kd = topk_distillation_loss(logits, teacher, weights.distill_temperature)
        else:
            kd = distillation_loss(logits, teacher, weights.distill_temperature)
        loss = loss + weights.distill_weight * kd
        metrics["kd"] = float(kd.detach())
    return loss, metrics


def module_rates(model: SkipGPTModel) -> dict[str, float]:
    """``{"attn_skip": r, "mlp_skip": r}``: each routed module's skip rate of the last forward,
    averaged over layers (the rates ``model.state.skip_rates`` holds, one per (layer, module))."""
    rates = model.state.skip_rates
    out = {}
    for m in model.skipgpt_config.modules:
        vals = [float(v.detach() if torch.is_tensor(v) else v) for (_, mod), v in rates.items() if mod == m]
        out[f"{m}_skip"] = sum(vals) / max(len(vals), 1)
    return out
