"""Stage 2, LoRA recovery; the SkipGPT-Joint variant; the dense + LoRA control; merging.

LoRA comes from peft (``get_peft_model`` / ``PeftModel.from_pretrained``) applied to the HF
model *inside* a ``SkipGPTModel``. The routed layers wrap the original layers, so peft's
suffix matching (``q_proj``, ``v_proj``, ``gate_proj``) finds the same linear layers it would
find in the plain model; the router MLPs are excluded by name and never become targets.

Stage 2 (``finetune_lora``): routers frozen bit-for-bit, only ``lora_`` parameters train, loss
= ``lm_weight`` · LM + ``distill_weight`` · KL(dense teacher ‖ routed), the teacher being the
same frozen base model with every module executing and LoRA off (as in stage 1). LM only by
default: on SmolLM2 (routers of 100 steps, LoRA 50 steps of 4×256) adding it moved PPL by
0.5% at twice the step time (``benchmarks/lora_table.py`` runs both). Router decisions during stage 2 are **deterministic** by default (the inference rule,
execute iff p(execute) >= θ with the calibrated θ of stage 1): LoRA then learns to repair
exactly the routing the model will face at inference. Sampling (Gumbel at τ_end, what the
paper's code gets if the routers simply stay in training mode) is available as
``routing='sampled'``; it trains LoRA on noisier routings than it will meet.

SkipGPT-Joint (``train_joint``): routers and LoRA from scratch in one run, with the stage-1 loss
``LM + α·|target − s|`` and Gumbel sampling (the paper's ablation). With
``continue_routers`` the same run starts from stage-1 routers, which keep training beside LoRA
(τ held at τ_end): at small budgets, where routers are far from converged, this beat both
frozen-router stage 2 and Joint from scratch on SmolLM2 (README, stage 2).

Output folder: ``skipgpt_config.json`` + ``routers.safetensors`` + ``adapter/`` (peft's
``adapter_config.json`` and ``adapter_model.safetensors``). A dense + LoRA folder has the
config (``router_config: null``) and ``adapter/`` only.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..checkpoint import ADAPTER_DIR, LAYER_REMOVAL_KEY, ROUTERS_NAME, FolderRecord
from ..errors import SkipGPTError
from ..lora_adapter import attach_adapter, forget_peft, get_peft, remember_peft
from ..model import SkipGPTModel
from ..outputs import prepare_output_dir, staged_dir
from .loop import CHECKPOINT_DIR, LoopArgs, claim_output_dir, finish_output, save_on_main_process, train_loop
from .losses import check_loss_weights
from .objectives import lm_and_distillation, module_rates
from .router_tuning import RouterTuningArgs, calibrate_and_measure, make_step_fn

__all__ = [
    "LoraArgs",
    "ADAPTER_DIR",
    "DEFAULT_TARGETS",
    "STAGE2_ROUTING",
    "linear_module_names",
    "check_targets",
    "add_lora",
    "load_adapter",
    "get_peft",
    "lora_parameters",
    "merge_lora",
    "finetune_lora",
    "train_joint",
    "save_with_adapter",
]

DEFAULT_TARGETS = ("q_proj", "v_proj", "gate_proj")  # the paper's code
STAGE2_ROUTING = ("deterministic", "sampled")
ROUTING_REASON = {
    "deterministic": "routers frozen and deciding as at inference (p(execute) >= threshold, no noise), "
    "so LoRA learns to repair exactly the routing it will face when the model is used",
    "sampled": "routers frozen but sampling (straight-through Gumbel at tau_end), as the paper's code "
    "does when the routers stay in training mode; LoRA sees noisier routings than at inference",
}
# Router MLPs live under `routers.<module>.net.<i>`, substitutes under `substitutes.<module>.{down,up}`;
# never LoRA targets, whatever the user asks.
ROUTER_EXCLUDE = r".*\.(routers|substitutes)\..*"


@dataclass
class LoraArgs:
    """LoRA settings (defaults: the paper's code). Field names as peft's ``LoraConfig`` where
    they are peft's (``r``, ``lora_alpha``); metadata as ``SkipGPTConfig``'s (the CLI flags)."""

    targets: tuple[str, ...] = field(
        default=DEFAULT_TARGETS,
        metadata={
            "help": "comma-separated linear module names, or all-linear (routers are never targets)",
            "flag": "--lora-targets",
        },
    )
    r: int = field(default=16, metadata={"help": "LoRA rank", "flag": "--lora-r", "type": "positive_int"})
    lora_alpha: float = field(
        default=32.0, metadata={"help": "LoRA scale numerator (the update is scaled by lora_alpha / r)"}
    )
    dropout: float = field(
        default=0.1, metadata={"help": "dropout on the LoRA input", "flag": "--lora-dropout"}
    )
    routing: str = field(
        default="deterministic",
        metadata={
            "help": "router decisions during stage 2: deterministic = as at inference, sampled = Gumbel at tau-end",
            "flag": "--stage2-routing",
            "choices": STAGE2_ROUTING,
        },
    )
    # the loss of stage 2 and of the dense + LoRA control (SkipGPT-Joint uses RouterTuningArgs')
    lm_weight: float = field(default=1.0, metadata={"help": "weight of the LM loss in stage 2", "cli": False})
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "stage 2 and --dense: weight of KL(dense base model || model) added to the LM loss "
            "(0 = LM only, the default: on SmolLM2 it gained 0.5% PPL at twice the step time); "
            "--joint uses --distill-weight",
            "flag": "--stage2-distill-weight",
            "type": "non_negative",
        },
    )
    distill_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of self-distillation", "cli": False}
    )

    def __post_init__(self) -> None:
        check_loss_weights(self.lm_weight, self.distill_weight, self.distill_temperature)
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if not self.targets:
            raise SkipGPTError("LoRA targets must name at least one module, e.g. q_proj,v_proj,gate_proj")
        if not isinstance(self.r, int) or self.r < 1:
            raise SkipGPTError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise SkipGPTError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.dropout < 1:
            raise SkipGPTError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.routing not in STAGE2_ROUTING:
            raise SkipGPTError(f"stage-2 routing must be one of {list(STAGE2_ROUTING)}, got {self.routing!r}")


# -- attaching LoRA ---------------------------------------------------------------------------
def _hf(model: nn.Module) -> nn.Module:
    return model.hf_model if isinstance(model, SkipGPTModel) else model


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of the model's linear layers that LoRA may target (routers excluded)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in _hf(model).named_modules()
            if isinstance(m, nn.Linear) and not re.fullmatch(ROUTER_EXCLUDE, "." + name)
        }
    )


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str] | str:
    """``targets`` as peft wants them; a name no linear layer has is refused, listing those there are."""
    if targets == ("all-linear",):
        return "all-linear"
    full = [
        n
        for n, m in _hf(model).named_modules()
        if isinstance(m, nn.Linear) and not re.fullmatch(ROUTER_EXCLUDE, "." + n)
    ]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in full)]
    if missing:
        raise SkipGPTError(
            f"LoRA target module(s) {missing} not found; this model's linear modules are: "
            f"{', '.join(linear_module_names(model))} (or all-linear)"
        )
    return list(targets)


def add_lora(model: nn.Module, args: LoraArgs | None = None):
    """Inject fresh LoRA layers into ``model`` (a ``SkipGPTModel`` or a plain HF model), in place.

    Everything but the LoRA parameters is frozen (routers included). Returns the PeftModel.
    """
    from peft import LoraConfig, get_peft_model

    args = args or LoraArgs()
    if get_peft(model) is not None:
        raise SkipGPTError("model already has a LoRA adapter; merge it (skipgpt export --merge) first")
    targets = check_targets(model, args.targets)
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        # a plain model has no routers (and peft warns when an exclusion matches nothing)
        exclude_modules=ROUTER_EXCLUDE if isinstance(model, SkipGPTModel) else None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(_hf(model), config)
    remember_peft(model, peft_model)
    return peft_model


def load_adapter(model: nn.Module, path: str | Path, trainable: bool = False):
    """Restore a saved ``adapter/`` folder into ``model`` (in place); returns the PeftModel.
    (``lora_adapter.attach_adapter``, which loading uses, given the HF model inside ``model``.)"""
    return attach_adapter(model, path, hf=_hf(model), trainable=trainable)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter of every LoRA weight (names as in the HF model)."""
    return {n: p for n, p in _hf(model).named_parameters() if "lora_" in n}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights (peft ``merge_and_unload``); returns the model without peft.

    For a ``SkipGPTModel`` the routed layers are taken off first (peft would mistake their
    ``base_layer`` attribute for one of its own wrappers) and put back on the merged model with
    the same routers; a new ``SkipGPTModel`` is returned.
    """
    peft_model = get_peft(model)
    if peft_model is None:
        return model
    if not isinstance(model, SkipGPTModel):
        merged = peft_model.merge_and_unload()
        forget_peft(merged)
        return merged
    routers = {k: v.detach().clone() for k, v in model.router_state_dict().items()}
    hf = model.unwrap()
    merged = peft_model.merge_and_unload()
    out = SkipGPTModel(merged, model.skipgpt_config, base_spec=model.base_spec)
    out.state.threshold = model.state.threshold  # e.g. load_model(..., threshold=θ)
    with torch.no_grad():
        for k, p in out.router_state_dict().items():
            p.copy_(routers[k])
    out.metadata = getattr(model, "metadata", {})
    assert merged is hf
    return out.train(model.training)


# -- saving -----------------------------------------------------------------------------------
def save_with_adapter(
    model: nn.Module, output_dir: str | Path, metadata: dict, base_spec: str | None = None
) -> Path:
    """Write config (+ routers for a routed model) + ``adapter/`` into ``output_dir`` as one unit.

    Written complete beside the old folder and swapped in (``outputs.staged_dir``); the old folder's
    checkpoint is kept, routers of an earlier model are not (a dense + LoRA model has none).
    """
    peft_model = get_peft(model)
    output_dir = prepare_output_dir(output_dir)
    with staged_dir(output_dir, drop=(ROUTERS_NAME,)) as stage:
        if isinstance(model, SkipGPTModel):
            model.save_pretrained(stage, metadata=metadata)
        else:  # dense + LoRA: no routers (checkpoint kind 'dense-lora')
            record = FolderRecord(
                base_model=base_spec,
                router_config=None,
                model_type=model.config.model_type,
                metadata=metadata,
            )
            checkpoint.write(stage, record)
        if peft_model is not None:
            peft_model.save_pretrained(str(stage / ADAPTER_DIR))
    return output_dir


# -- training ---------------------------------------------------------------------------------
def _deterministic_override(model: SkipGPTModel):
    """Routing override: the inference decision (no noise) while the layers are in training mode."""
    layers, state = model.routed_layers, model.state

    def override(i: int, m: str, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layers[i].execute_probability(m, h) >= state.threshold

    return override


def _check_resume(output_dir: Path, named: dict[str, nn.Parameter]) -> None:
    """A checkpoint made with another rank or other targets is refused before it is loaded."""
    from safetensors import safe_open

    path = output_dir / CHECKPOINT_DIR / "trainable.safetensors"
    if not path.exists():
        return  # train_loop reports the missing checkpoint
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    ours = {k: tuple(p.shape) for k, p in named.items()}
    if shapes != ours:
        raise SkipGPTError(
            f"checkpoint in {output_dir} was made with other LoRA settings (rank, targets or routers); "
            "resume with the same settings or start a new --output"
        )


def finetune_lora(
    model: nn.Module,
    blocks: torch.Tensor,
    output_dir: str | Path,
    loop: LoopArgs,
    args: LoraArgs | None = None,
    *,
    base_spec: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    metadata: dict | None = None,
    on_step=None,
    progress: bool = True,
) -> dict:
    """Stage 2 on a routed ``SkipGPTModel`` (routers frozen), or dense + LoRA on a plain HF model.

    blocks: (N, T) token ids. Saves to ``output_dir``; returns ``{"output", "steps",
    "final_loss", "history"}``. ``base_spec`` is recorded for a dense model (how to reload it;
    default: the model's ``name_or_path``). ``on_step(step, metrics)`` runs after every step.
    """
    args = args or LoraArgs()
    output_dir = claim_output_dir(output_dir, resume, overwrite)
    routed = isinstance(model, SkipGPTModel)
    if not routed:
        base_spec = base_spec or getattr(model.config, "_name_or_path", None)
        if not base_spec:  # the saved folder could not be loaded again
            raise SkipGPTError(
                "dense + LoRA needs base_spec, the model spec to reload the base model from "
                "(e.g. 'smollm2-135m' or 'random:llama')"
            )
    add_lora(model, args)
    named = lora_parameters(model)
    if resume:
        _check_resume(output_dir, named)

    def step_fn(forward, input_ids: torch.Tensor, step: int):
        loss, terms = lm_and_distillation(model, forward, input_ids, args, use_cache=False)
        metrics = {"loss": float(loss.detach()), **terms}
        if routed:
            metrics.update(sparsity=float(model.realised_sparsity().detach()), **module_rates(model))
        return loss, metrics

    if routed and args.routing == "deterministic":
        ctx = model.routing(override=_deterministic_override(model))
    elif routed:
        ctx = model.routing(tau=model.skipgpt_config.tau_end)
    else:
        from contextlib import nullcontext

        ctx = nullcontext()
    with ctx:
        history = train_loop(
            model,
            named,
            blocks,
            loop,
            step_fn,
            output_dir,
            resume=resume,
            desc="LoRA",
            on_step=on_step,
            progress=progress,
        )
    model.eval()
    meta = dict(metadata or {})
    if routed:
        meta.update(
            stage="lora",
            stage2_routing=args.routing,
            stage2_routing_reason=ROUTING_REASON[args.routing],
            **_stage1_metadata(model),
        )
    else:
        meta.update(stage="dense_lora")
    meta.update(lora=asdict(args), loop=asdict(loop), history=history)
    save_on_main_process(save_with_adapter, model, output_dir, meta, base_spec=base_spec)
    finish_output(output_dir, keep_checkpoint=loop.keep_checkpoint)
    return {
        "output": str(output_dir),
        "steps": loop.max_steps,
        "final_loss": history[-1]["loss"],
        "history": history,
    }


def _stage1_metadata(model: SkipGPTModel) -> dict:
    """What a folder trained from stage-1 routers keeps of theirs: the stage-1 metadata (without
    its history) under ``stage1``, and LLM-Drop's removed modules, which must stay gone on reload."""
    parent = getattr(model, "metadata", {}) or {}
    meta = {"stage1": {k: v for k, v in parent.items() if k != "history"}}
    if parent.get("removed_modules"):
        meta["removed_modules"] = parent["removed_modules"]
    if LAYER_REMOVAL_KEY in parent:  # routers trained around deleted layers stay routed, not LLM-Drop
        meta[LAYER_REMOVAL_KEY] = parent[LAYER_REMOVAL_KEY]
    return meta


def train_joint(
    model: SkipGPTModel,
    blocks: torch.Tensor,
    output_dir: str | Path,
    loop: LoopArgs,
    args: LoraArgs | None = None,
    tuning: RouterTuningArgs | None = None,
    *,
    router_lr: float = 2e-3,
    continue_routers: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    metadata: dict | None = None,
    on_step=None,
    progress: bool = True,
) -> dict:
    """SkipGPT-Joint: routers and LoRA trained together with the stage-1 loss.

    Fresh routers by default (the paper's ablation). ``continue_routers``: the model holds
    stage-1 routers, which keep training beside LoRA instead of staying frozen; they are
    already annealed, so the Gumbel temperature stays at tau_end and the target is not ramped
    (``tuning.curriculum`` ignored). Routers learn at ``router_lr`` and LoRA at ``loop.lr`` (one
    optimizer, two groups). After training θ is calibrated to the target as in stage 1
    (``tuning.calibrate_blocks``). ``on_step(step, metrics)`` runs after every step.
    """
    if not isinstance(model, SkipGPTModel):
        raise SkipGPTError("--joint needs a routed model (get_skipgpt_model on the base model)")
    args = args or LoraArgs()
    tuning = tuning or RouterTuningArgs()
    if router_lr <= 0:
        raise SkipGPTError(f"router lr must be > 0, got {router_lr}")
    if continue_routers:
        tuning = replace(tuning, curriculum=0.0)
    output_dir = claim_output_dir(output_dir, resume, overwrite)
    add_lora(model, args)
    routers = {f"routers.{k}": p for k, p in model.router_state_dict().items()}
    for p in routers.values():
        p.requires_grad_(True)
    model.freeze_protected_routers()
    named = {**routers, **lora_parameters(model)}
    if resume:
        _check_resume(output_dir, named)
    history = train_loop(
        model,
        named,
        blocks,
        loop,
        make_step_fn(model, loop, tuning, anneal=not continue_routers),
        output_dir,
        resume=resume,
        desc="routers+LoRA" if continue_routers else "joint routers+LoRA",
        on_step=on_step,
        progress=progress,
        lr_scale={k: router_lr / loop.lr for k in routers},
    )
    model.eval()
    for p in routers.values():
        p.requires_grad_(False)
    calibration = (
        calibrate_and_measure(model, blocks[: tuning.calibrate_blocks])
        if tuning.calibrate_blocks > 0
        else None
    )
    meta = dict(metadata or {})
    meta.update(
        stage="joint",
        routers="continued from stage 1" if continue_routers else "new",
        router_lr=router_lr,
        threshold_calibration=calibration,
        router_tuning=asdict(tuning),
        lora=asdict(args),
        loop=asdict(loop),
        history=history,
    )
    if continue_routers:
        meta.update(_stage1_metadata(model))
    save_on_main_process(save_with_adapter, model, output_dir, meta)
    finish_output(output_dir, keep_checkpoint=loop.keep_checkpoint)
    return {
        "output": str(output_dir),
        "steps": loop.max_steps,
        "final_loss": history[-1]["loss"],
        "history": history,
    }
