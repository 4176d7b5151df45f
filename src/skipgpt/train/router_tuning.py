"""Stage 1, router tuning: the base model is frozen and only the routers learn.

Loss per step::

    lm_weight * LM  +  alpha * |target_t - s|  [+ distill_weight * KL(dense teacher || routed)]

where ``s`` is the realised skip rate of the step (modules or parameters, ``config.budget``),
``target_t`` the (optionally ramped) target, and the teacher is the same frozen model with
every module executing (free: no second model in memory). With ``teacher_cache=K`` the teacher's
top-K logits are computed once per block and reused (``train.teacher_cache``): the KL is then
over those K tokens plus the tail mass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import SkipGPTError
from ..model import SkipGPTModel
from .loop import LoopArgs, claim_output_dir, save_on_main_process, train_loop
from .losses import (
    check_loss_weights,
    curriculum_target,
    distillation_loss,
    shifted_lm_loss,
    sparsity_penalty,
    temperature_at,
)

__all__ = ["RouterTuningArgs", "train_routers"]


@dataclass
class RouterTuningArgs:
    """Stage-1 settings beyond the router config (which holds target, alpha and tau)."""

    lm_weight: float = 1.0
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    curriculum: float = 0.0  # fraction of the run over which the target ramps up from 0
    calibrate_blocks: int = 16  # after training, set θ to hit the target on this many blocks (0 = keep θ)
    # distillation from the dense teacher's top-k logits, computed once per block and cached
    # (train.teacher_cache); 0 = the live teacher's full distribution every step
    teacher_cache: int = 0
    teacher_cache_dir: str | None = None  # keep the cached teacher here across runs (None: memory only)

    def __post_init__(self) -> None:
        check_loss_weights(self.lm_weight, self.distill_weight, self.distill_temperature)
        if not isinstance(self.teacher_cache, int) or self.teacher_cache < 0:
            raise SkipGPTError(
                f"teacher_cache must be an integer >= 0 (top-k logits kept, 0 = off), got {self.teacher_cache!r}"
            )
        if not 0 <= self.curriculum <= 1:
            raise SkipGPTError(f"curriculum must be a fraction in [0, 1], got {self.curriculum}")


def _module_rates(model: SkipGPTModel) -> dict[str, float]:
    rates = model.state.skip_rates
    out = {}
    for m in model.skipgpt_config.modules:
        vals = [float(v.detach() if torch.is_tensor(v) else v) for (_, mod), v in rates.items() if mod == m]
        out[f"{m}_skip"] = sum(vals) / max(len(vals), 1)
    return out


def dense_teacher(model):
    """Context in which ``model`` is its own distillation teacher: the frozen base model, every
    module executing (routing off) and LoRA, if attached, switched off."""
    from contextlib import ExitStack

    from .lora import get_peft

    stack = ExitStack()
    if isinstance(model, SkipGPTModel):
        stack.enter_context(model.dense())
    peft_model = get_peft(model)
    if peft_model is not None:
        stack.enter_context(peft_model.disable_adapter())
    return stack


def lm_and_distillation(
    model, forward, input_ids: torch.Tensor, weights, *, teacher_cache=None, **forward_kwargs
):
    """One student forward (after a teacher forward in ``dense_teacher`` when distilling).

    ``weights`` has ``lm_weight``, ``distill_weight`` and ``distill_temperature`` (the stage-1
    or stage-2 args). Returns ``(loss, metrics)``: ``lm_weight·LM + distill_weight·KD`` (0.0
    when both terms are off) and the terms' values under ``lm`` / ``kd``. With a
    ``teacher_cache`` (``train.teacher_cache.TeacherCache``) the teacher runs only for blocks it
    has not seen, under ``inference_mode``, and KD is the top-k KL (``topk_distillation_loss``).
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


def make_teacher_cache(model, loop: LoopArgs, args: RouterTuningArgs):
    """The run's ``TeacherCache`` when ``args.teacher_cache`` > 0 and distilling, else None.
    Its identity: the base model (spec and weights' fingerprint) and the autocast setting the
    teacher runs under."""
    if args.teacher_cache <= 0 or args.distill_weight <= 0:
        return None
    from .teacher_cache import TeacherCache, weights_fingerprint

    identity = f"{getattr(model, 'base_spec', None)}|{weights_fingerprint(model)}|{loop.mixed_precision}"
    return TeacherCache(
        args.teacher_cache, args.distill_temperature, identity=identity, directory=args.teacher_cache_dir
    )


def make_step_fn(model: SkipGPTModel, loop: LoopArgs, args: RouterTuningArgs, *, anneal: bool = True):
    """The stage-1 step: Gumbel temperature annealed tau_start → tau_end over the run (held at
    tau_end if not ``anneal``), target ramped by the curriculum, task loss + sparsity penalty."""
    cfg = model.skipgpt_config
    tau_start = cfg.tau_start if anneal else cfg.tau_end
    cache = make_teacher_cache(model, loop, args)

    def step_fn(forward, input_ids: torch.Tensor, step: int):
        tau = temperature_at(tau_start, cfg.tau_end, step, loop.max_steps)
        target = curriculum_target(cfg.target_sparsity, step, loop.max_steps, args.curriculum)
        model.set_temperature(tau)
        task_loss, metrics = lm_and_distillation(model, forward, input_ids, args, teacher_cache=cache)
        realised = model.realised_sparsity()
        loss = sparsity_penalty(realised, target, cfg.alpha) + task_loss
        metrics.update(_module_rates(model))
        metrics.update(loss=float(loss.detach()), sparsity=float(realised.detach()), tau=tau, target=target)
        return loss, metrics

    return step_fn


def calibrate_and_measure(
    model: SkipGPTModel, blocks: torch.Tensor, target: float | None = None, budget: str | None = None
) -> dict:
    """Deterministic sparsity at the current θ, then θ re-set so that ``target`` (default: the
    config's) is met on ``blocks`` in ``budget`` (default: the config's); returns both θs and the
    sparsity realised at each."""
    from ..calibration import calibrate_threshold
    from ..eval.perplexity import evaluate_perplexity

    target = model.skipgpt_config.target_sparsity if target is None else target
    budget = budget or model.skipgpt_config.budget
    before = model.state.threshold
    at_before = evaluate_perplexity(model, blocks, progress=False)["sparsity"]
    theta = calibrate_threshold(model, blocks, target, budget=budget)
    at_after = evaluate_perplexity(model, blocks, progress=False)["sparsity"]
    pick = ("module", "attn", "mlp", "params")
    return {
        "threshold_before": before,
        "sparsity_before": {k: at_before[k] for k in pick},
        "threshold": theta,
        "sparsity_after": {k: at_after[k] for k in pick},
        "blocks": int(blocks.shape[0]),
        "target": target,
        "budget": budget,
    }


def train_routers(
    model: SkipGPTModel,
    blocks: torch.Tensor,
    output_dir: str | Path,
    loop: LoopArgs,
    args: RouterTuningArgs | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    metadata: dict | None = None,
    on_step=None,
    progress: bool = True,
) -> dict:
    """Tune the routers of ``model`` on ``blocks`` (N, T) and save them to ``output_dir``.

    Returns ``{"output", "steps", "final_loss", "history"}``.
    """
    args = args or RouterTuningArgs()
    output_dir = claim_output_dir(output_dir, resume, overwrite)
    model.mark_only_routers_trainable()
    named = {k: p for k, p in model.router_state_dict().items()}
    history = train_loop(
        model,
        named,
        blocks,
        loop,
        make_step_fn(model, loop, args),
        output_dir,
        resume=resume,
        desc="router tuning",
        on_step=on_step,
        progress=progress,
    )
    model.eval()
    calibration = None
    if args.calibrate_blocks > 0:
        calibration = calibrate_and_measure(model, blocks[: args.calibrate_blocks])
    meta = {
        "stage": "router_tuning",
        "threshold_calibration": calibration,
        "loop": asdict(loop),
        "router_tuning": asdict(args),
        **(metadata or {}),
    }
    meta["history"] = history
    save_on_main_process(model.save_pretrained, output_dir, metadata=meta)
    return {
        "output": str(output_dir),
        "steps": loop.max_steps,
        "final_loss": history[-1]["loss"],
        "history": history,
    }
