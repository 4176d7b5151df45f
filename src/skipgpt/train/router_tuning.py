"""Stage 1, router tuning: the base model is frozen and only the routers learn.

Loss per step::

    lm_weight * LM  +  sparsity_weight * |target_t - s|  [+ distill_weight * KL(dense teacher || routed)]

where ``s`` is the realised skip rate of the step (modules or parameters, ``config.budget``),
``target_t`` the (optionally ramped) target, and the teacher is the same frozen model with
every module executing (free: no second model in memory). With ``teacher_cache=K`` the teacher's
top-K logits are computed once per block and reused (``train.teacher_cache``): the KL is then
over those K tokens plus the tail mass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SkipGPTError
from ..model import SkipGPTModel
from ..substitutes import fit_substitutes
from .loop import LoopArgs, claim_output_dir, finish_output, save_on_main_process, train_loop
from .losses import check_loss_weights, curriculum_target, sparsity_penalty, temperature_at
from .objectives import lm_and_distillation, module_rates

__all__ = ["RouterTuningArgs", "train_routers"]


@dataclass
class RouterTuningArgs:
    """Stage-1 settings beyond the router config (which holds target, sparsity weight and tau).

    The defaults are the default recipe (``skipgpt.train.recipes``): self-distillation from the
    dense model and a 30% sparsity curriculum, with which dense-start routers also learn on small
    models; the paper's recipe (LM loss only, fixed target) is ``RECIPES["paper"]``.
    """

    lm_weight: float = field(default=1.0, metadata={"help": "weight of the LM loss"})
    distill_weight: float = field(
        default=1.0, metadata={"help": "weight of KL(dense teacher || routed) self-distillation (0 = off)"}
    )
    distill_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of self-distillation"}
    )
    curriculum: float = field(
        default=0.3,
        metadata={"help": "fraction of the run over which the target ramps from 0 (0 = fixed target)"},
    )
    calibrate_blocks: int = field(
        default=16,
        metadata={
            "help": "after training, set θ so that deterministic routing meets the target on this many "
            "training blocks (0 = keep --threshold)"
        },
    )
    teacher_cache: int = field(
        default=0,
        metadata={
            "help": "distil from the dense teacher's top-K logits, computed once per block and cached; "
            "the KL is then over those K tokens plus the tail mass (0 = the live teacher every step)",
            "metavar": "K",
        },
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "keep the teacher cache in this folder, reused by later runs on the same model and blocks"
        },
    )

    def __post_init__(self) -> None:
        check_loss_weights(self.lm_weight, self.distill_weight, self.distill_temperature)
        if not isinstance(self.teacher_cache, int) or self.teacher_cache < 0:
            raise SkipGPTError(
                f"teacher_cache must be an integer >= 0 (top-k logits kept, 0 = off), got {self.teacher_cache!r}"
            )
        if not 0 <= self.curriculum <= 1:
            raise SkipGPTError(f"curriculum must be a fraction in [0, 1], got {self.curriculum}")


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

    floor = model.removed_sparsity()  # modules removed for good: skipped from the first step

    def step_fn(forward, input_ids: torch.Tensor, step: int):
        tau = temperature_at(tau_start, cfg.tau_end, step, loop.max_steps)
        target = curriculum_target(cfg.target_sparsity, step, loop.max_steps, args.curriculum, floor)
        model.set_temperature(tau)
        task_loss, metrics = lm_and_distillation(model, forward, input_ids, args, teacher_cache=cache)
        realised = model.realised_sparsity()
        loss = sparsity_penalty(realised, target, cfg.sparsity_weight) + task_loss
        metrics.update(module_rates(model))
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
    from ..eval.perplexity import DENSE_SPARSITY, evaluate_perplexity

    target = model.skipgpt_config.target_sparsity if target is None else target
    budget = budget or model.skipgpt_config.budget
    before = model.state.threshold
    at_before = evaluate_perplexity(model, blocks, progress=False)["sparsity"]
    theta = calibrate_threshold(model, blocks, target, budget=budget)
    at_after = evaluate_perplexity(model, blocks, progress=False)["sparsity"]
    pick = tuple(DENSE_SPARSITY)  # the shares, without per_layer
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
    substitutes = None
    if model.substitute_params and model.skipgpt_config.substitute_init == "closed-form" and not resume:
        # before training: the closed-form fit on the first 8K tokens (a resumed run loads its own)
        substitutes = fit_substitutes(model, blocks)
    model.mark_only_routers_trainable()  # and the substitutes
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
        **({"substitutes_fit": substitutes} if substitutes else {}),
        "loop": asdict(loop),
        "router_tuning": asdict(args),
        **(metadata or {}),
    }
    meta["history"] = history
    save_on_main_process(model.save_pretrained, output_dir, metadata=meta)
    finish_output(output_dir, keep_checkpoint=loop.keep_checkpoint)
    return {
        "output": str(output_dir),
        "steps": loop.max_steps,
        "final_loss": history[-1]["loss"],
        "history": history,
    }
