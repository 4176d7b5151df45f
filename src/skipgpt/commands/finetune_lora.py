"""``skipgpt finetune-lora``: stage 2 (LoRA on a routed model, routers frozen), the dense + LoRA
control (``--dense``) and SkipGPT-Joint (``--joint``: routers and LoRA together, the routers new or,
from a ``train-router`` folder, continued)."""

from __future__ import annotations

from .common import (
    add_config_arg,
    add_device_args,
    add_json_arg,
    add_model_arg,
    emit,
    load_options,
    refuse_output_at_model,
    warn_if_beyond_positions,
)
from .train_router import add_loop_args, add_router_args, loop_args_from_args

__all__ = ["add_parser", "run", "lora_args_from_args"]

# LoRA as the paper's code trains it (``LoraArgs``' defaults, ``recipes.LORA_LOOP``): q/v/gate
# projections, r=16, lora_alpha=32, dropout 0.1; lr 2e-4 cosine, 10% warm-up.
LORA_FIELDS = ("targets", "r", "lora_alpha", "dropout", "routing", "distill_weight")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune-lora",
        help="stage 2: LoRA on a routed model (routers frozen); --dense: dense + LoRA; --joint: SkipGPT-Joint",
        description="Stage 2 of SkipGPT: LoRA recovery of a routed model whose routers stay frozen. "
        "--model is a `train-router` output folder (or, with --dense / --joint, a base model spec). "
        "The loss options apply to --joint only, the router options to --joint from a base model "
        "(stage 2's loss: LM, plus --stage2-distill-weight).",
    )
    add_model_arg(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dense", action="store_true", help="dense + LoRA control: no routers (the base model of --model)"
    )
    mode.add_argument(
        "--joint",
        action="store_true",
        help="train routers and LoRA together with the stage-1 loss: new routers from a base model "
        "spec (SkipGPT-Joint, router options below), or the routers of a train-router folder, "
        "which keep training instead of staying frozen (their config kept, tau held at tau-end, "
        "no curriculum)",
    )
    from ..train.lora import LoraArgs
    from ..train.recipes import LORA_LOOP, ROUTER_LR
    from .dataclass_args import add_dataclass_args

    g = p.add_argument_group("LoRA")
    add_dataclass_args(g, LoraArgs, LORA_FIELDS)
    g.add_argument(
        "--router-lr",
        type=float,
        default=ROUTER_LR,
        help="with --joint: learning rate of the routers (default: %(default)s)",
    )
    add_router_args(p)
    loop = {k: getattr(LORA_LOOP, k) for k in ("lr", "lr_scheduler", "warmup_ratio")}
    add_loop_args(p, defaults=loop)
    add_device_args(p)
    add_config_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


# argparse dests of the router options (router config) and of the stage-1 loss
ROUTER_OPTIONS = (
    "target_sparsity budget sparsity_weight tau_start tau_end router_hidden router_init execute_bias modules "
    "mlp_router_input threshold"
).split()
STAGE1_LOSS_OPTIONS = ("lm_weight", "distill_weight", "curriculum", "router_lr", "calibrate_blocks")


def _refuse_ignored(args, continue_routers: bool) -> None:
    """Options this mode does not use end in an error instead of being silently dropped."""
    from .common import refuse_ignored_options

    if args.dense:
        refuse_ignored_options(
            args, ROUTER_OPTIONS + [*STAGE1_LOSS_OPTIONS, "stage2_routing"], "--dense trains no routers"
        )
    elif continue_routers:
        refuse_ignored_options(
            args,
            ROUTER_OPTIONS + ["curriculum", "stage2_routing", "stage2_distill_weight"],
            f"--joint on {args.model} keeps its routers' config (target, τ held at tau-end, no "
            "curriculum) and uses the stage-1 loss options",
        )
    elif args.joint:
        refuse_ignored_options(
            args, ["stage2_routing", "stage2_distill_weight"], "--joint uses the stage-1 loss options"
        )
    else:
        refuse_ignored_options(
            args,
            ROUTER_OPTIONS + list(STAGE1_LOSS_OPTIONS),
            f"stage 2 keeps the routers of {args.model} as trained and its loss is LM + "
            "--stage2-distill-weight (--joint trains routers too)",
        )


def lora_args_from_args(args):
    """``LoraArgs`` of the LoRA flags; self-distillation at ``--distill-temperature``."""
    from ..train.lora import LoraArgs
    from .dataclass_args import dataclass_from_args

    return dataclass_from_args(LoraArgs, args, distill_temperature=args.distill_temperature)


def _routed_source(folder: str):
    """Check that ``folder`` is a stage-1 output; return its record (``checkpoint.FolderRecord``)."""
    from pathlib import Path

    from .. import checkpoint
    from ..checkpoint import ROUTERS_NAME
    from ..errors import SkipGPTError

    hint = "pass --dense for the dense + LoRA control or --joint to train routers and LoRA together"
    if not checkpoint.is_skipgpt_dir(folder):
        raise SkipGPTError(
            f"{folder} is not a skipgpt output folder (no {checkpoint.CONFIG_NAME}): stage 2 needs the routers of "
            f"`skipgpt train-router`; {hint}"
        )
    record = checkpoint.read(folder)
    if not record.routed or not (Path(folder) / ROUTERS_NAME).exists():
        raise SkipGPTError(
            f"{folder} has no routers ({ROUTERS_NAME} missing): stage 2 needs the output of "
            f"`skipgpt train-router`; {hint}"
        )
    if record.adapter is not None:
        raise SkipGPTError(
            f"{folder} already has a LoRA adapter; give its stage-1 folder, or `skipgpt export --merge` it first"
        )
    return record


def run(args) -> int:
    import torch

    from .. import checkpoint
    from ..checkpoint import is_skipgpt_dir
    from ..data import load_blocks
    from ..eval.perplexity import DENSE_SPARSITY, evaluate_perplexity
    from ..model import SkipGPTModel, get_skipgpt_model
    from ..specs import load_base_model
    from ..train.loop import claim_output_dir
    from ..train.lora import check_targets, finetune_lora, train_joint
    from .train_router import router_config_from_args, tuning_args_from_args

    lora = lora_args_from_args(args)
    loop = loop_args_from_args(args)
    refuse_output_at_model(args, "stage 2 writes a new folder beside the routers")
    # refuse a foreign, finished, interrupted or unwritable folder before any slow work
    claim_output_dir(args.output, args.resume, args.overwrite)
    meta = {"dataset": args.dataset, "seq_len": args.seq_len, "source": str(args.model)}
    torch.manual_seed(args.seed)
    spec = args.model
    continue_routers = args.joint and is_skipgpt_dir(args.model)
    _refuse_ignored(args, continue_routers)
    if continue_routers:  # the stage-1 routers keep training beside LoRA
        record = _routed_source(args.model)
        base, tokenizer = load_base_model(record.base_spec, **load_options(args))
        model = SkipGPTModel.from_pretrained(args.model, base_model=base)
        tuning = tuning_args_from_args(args)
        kind = "stage 2 (LoRA, routers still training)"
    elif args.joint:
        config = router_config_from_args(args)
        tuning = tuning_args_from_args(args)
        base, tokenizer = load_base_model(args.model, **load_options(args))
        model = get_skipgpt_model(base, config, base_spec=args.model)
        kind = "SkipGPT-Joint"
    elif args.dense:
        if is_skipgpt_dir(args.model):  # the base model of a routed folder
            spec = checkpoint.read(args.model).base_spec
        model, tokenizer = load_base_model(spec, **load_options(args))
        kind = "dense + LoRA"
    else:
        record = _routed_source(args.model)
        base, tokenizer = load_base_model(record.base_spec, **load_options(args))
        model = SkipGPTModel.from_pretrained(args.model, base_model=base)
        kind = "stage 2 (LoRA, routers frozen)"
    check_targets(model, lora.targets)  # a wrong module name fails before the data is read
    warn_if_beyond_positions(model, args.seq_len)
    blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.max_blocks)
    meta["blocks"] = int(blocks.shape[0])
    common = dict(resume=args.resume, overwrite=args.overwrite, metadata=meta)
    if args.joint:
        result = train_joint(
            model,
            blocks,
            args.output,
            loop,
            lora,
            tuning,
            router_lr=args.router_lr,
            continue_routers=continue_routers,
            **common,
        )
    else:
        result = finetune_lora(model, blocks, args.output, loop, lora, base_spec=str(spec), **common)

    check = evaluate_perplexity(model, blocks[: min(8, blocks.shape[0])], progress=False)
    sparsity = {k: v for k, v in check["sparsity"].items() if k != "per_layer"} or dict(DENSE_SPARSITY)
    mode = "dense" if args.dense else "stage2"
    if args.joint:
        mode = "stage2+routers" if continue_routers else "joint"
    summary = {
        "output": result["output"],
        "steps": result["steps"],
        "final_loss": result["final_loss"],
        "mode": mode,
        "stage2_routing": None if (args.joint or args.dense) else lora.routing,
        "train_ppl": check["ppl"],
        "sparsity": sparsity,
    }
    from accelerate import PartialState

    if not PartialState().is_main_process:  # multi-process launch: rank 0 reports
        return 0
    human = (
        f"{kind}: saved to {result['output']} after {result['steps']} steps; final loss "
        f"{result['final_loss']:.4f}; on training blocks: ppl {check['ppl']:.3f}, module sparsity "
        f"{sparsity['module']:.3f} (attn {sparsity['attn']:.3f}, mlp {sparsity['mlp']:.3f}), params {sparsity['params']:.3f}"
    )
    emit(args, summary, human)
    return 0
