"""``skipgpt train-router``: stage 1, tune the routers of a frozen model."""

from __future__ import annotations

import argparse

from .common import add_json_arg, add_model_arg, emit, positive_int, probability, seq_len_int

# The default recipe: dense-start routers, self-distillation from the dense model and a 30%
# sparsity curriculum. The paper's recipe (random router init, LM loss only) is
# `--router-init paper --distill-weight 0 --curriculum 0`; `benchmarks/recipe.py` measures both.
DEFAULTS = dict(
    lr=2e-3,
    alpha=20.0,
    tau_start=5.0,
    tau_end=1.0,
    router_init="dense",
    execute_bias=3.0,
    distill_weight=1.0,
    lm_weight=1.0,
    distill_temperature=1.0,
    curriculum=0.3,
)


def add_router_args(p: argparse.ArgumentParser) -> None:
    """Router and stage-1 loss options (shared with commands that tune routers, e.g. baselines)."""
    g = p.add_argument_group("routers and loss")
    g.add_argument(
        "--target-sparsity", type=probability, default=0.25, help="fraction of decisions to skip (0, 1)"
    )
    g.add_argument(
        "--budget",
        choices=["modules", "params"],
        default="modules",
        help="what the target counts: routed decisions, or parameters of skipped modules",
    )
    g.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="sparsity regulariser weight")
    g.add_argument("--tau-start", type=float, default=DEFAULTS["tau_start"])
    g.add_argument("--tau-end", type=float, default=DEFAULTS["tau_end"])
    g.add_argument(
        "--router-hidden", type=int, default=None, help="router hidden width (default hidden/4; 0 = linear)"
    )
    g.add_argument("--router-init", choices=["dense", "paper"], default=DEFAULTS["router_init"])
    g.add_argument("--execute-bias", type=float, default=DEFAULTS["execute_bias"])
    g.add_argument("--modules", default="attn,mlp", help="routable modules: attn,mlp | attn | mlp")
    g.add_argument("--mlp-router-input", choices=["block_input", "post_attention"], default="block_input")
    g.add_argument(
        "--threshold", type=float, default=0.5, help="inference: execute iff p(execute) >= threshold"
    )
    g.add_argument("--lm-weight", type=float, default=DEFAULTS["lm_weight"])
    g.add_argument(
        "--distill-weight",
        type=float,
        default=DEFAULTS["distill_weight"],
        help="weight of KL(dense teacher || routed) self-distillation (0 = off)",
    )
    g.add_argument("--distill-temperature", type=float, default=DEFAULTS["distill_temperature"])
    g.add_argument(
        "--curriculum",
        type=float,
        default=DEFAULTS["curriculum"],
        help="fraction of the run over which the target ramps from 0 (0 = fixed target)",
    )
    g.add_argument(
        "--teacher-cache",
        type=int,
        default=0,
        metavar="K",
        help="distil from the dense teacher's top-K logits, computed once per block and cached; the "
        "KL is then over those K tokens plus the tail mass (0 = the live teacher every step)",
    )
    g.add_argument(
        "--teacher-cache-dir",
        default=None,
        help="keep the teacher cache in this folder, reused by later runs on the same model and blocks",
    )
    g.add_argument(
        "--calibrate-blocks",
        type=int,
        default=16,
        help="after training, set θ so that deterministic routing meets the target on this many "
        "training blocks (0 = keep --threshold)",
    )


def add_loop_args(p: argparse.ArgumentParser, lr: float) -> None:
    g = p.add_argument_group("data and optimisation")
    g.add_argument(
        "--dataset",
        default="calib",
        help="calib | wiki-heldout | ptb | a .txt/.jsonl/.parquet file or folder | hub dataset",
    )
    g.add_argument("--seq-len", type=seq_len_int, default=256)
    g.add_argument(
        "--max-blocks", type=positive_int, default=None, help="use at most this many blocks of the dataset"
    )
    g.add_argument("--max-steps", type=positive_int, default=300)
    g.add_argument("--batch-size", type=positive_int, default=8, help="blocks per micro-step and process")
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument(
        "--lr-scheduler", default="constant", help="transformers scheduler name (constant, cosine, linear)"
    )
    g.add_argument("--warmup-ratio", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps")
    g.add_argument(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        default=None,
        help="autocast the forward (bf16 on CPU or recent GPUs, fp16 on GPUs); routers stay fp32 "
        "(default: the accelerate launch setting, else no)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute decoder layers in backward: less activation memory for long sequences",
    )
    g.add_argument(
        "--output", required=True, help="output folder (new, or an earlier skipgpt output with --resume)"
    )
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    g.add_argument("--overwrite", action="store_true", help="replace a finished model in --output")


def add_parser(sub) -> None:
    p = sub.add_parser("train-router", help="stage 1: tune routers on a frozen model")
    add_model_arg(p)
    add_router_args(p)
    add_loop_args(p, lr=DEFAULTS["lr"])
    add_json_arg(p)
    p.set_defaults(func=run)


def router_config_from_args(args):
    from ..config import SkipGPTConfig

    return SkipGPTConfig(
        target_sparsity=args.target_sparsity,
        router_hidden=args.router_hidden,
        alpha=args.alpha,
        tau_start=args.tau_start,
        tau_end=args.tau_end,
        threshold=args.threshold,
        modules=args.modules,
        router_init=args.router_init,
        execute_bias=args.execute_bias,
        budget=args.budget,
        mlp_router_input=args.mlp_router_input,
    )


def loop_args_from_args(args):
    import os

    from ..train.loop import LoopArgs

    return LoopArgs(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        lr_scheduler=args.lr_scheduler,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        save_every=args.save_every,
        # unset: what `accelerate launch` (its flag or config file) asked for
        mixed_precision=args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(),
        gradient_checkpointing=args.gradient_checkpointing,
    )


def tuning_args_from_args(args):
    from ..train.router_tuning import RouterTuningArgs

    return RouterTuningArgs(
        lm_weight=args.lm_weight,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        curriculum=args.curriculum,
        calibrate_blocks=args.calibrate_blocks,
        teacher_cache=getattr(args, "teacher_cache", 0),
        teacher_cache_dir=getattr(args, "teacher_cache_dir", None),
    )


def run(args) -> int:
    import torch

    from ..data import load_blocks
    from ..errors import SkipGPTError
    from ..loading import is_skipgpt_dir
    from ..model import get_skipgpt_model
    from ..specs import load_base_model
    from ..train.loop import claim_output_dir
    from ..train.router_tuning import train_routers

    config = router_config_from_args(args)
    loop = loop_args_from_args(args)
    tuning = tuning_args_from_args(args)
    # refuse a foreign, finished, interrupted or unwritable folder before any slow work
    claim_output_dir(args.output, args.resume, args.overwrite)
    if is_skipgpt_dir(args.model):
        raise SkipGPTError(
            f"{args.model} is already a routed model; give its base model spec to train new routers"
        )
    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(args.model)
    blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.max_blocks)
    model = get_skipgpt_model(base, config, base_spec=args.model)
    result = train_routers(
        model,
        blocks,
        args.output,
        loop,
        tuning,
        resume=args.resume,
        overwrite=args.overwrite,
        metadata={"dataset": args.dataset, "seq_len": args.seq_len, "blocks": int(blocks.shape[0])},
    )
    # Realised sparsity of the final routers (deterministic routing) on a few training blocks.
    from ..eval.perplexity import evaluate_perplexity

    check = evaluate_perplexity(model, blocks[: min(8, blocks.shape[0])], progress=False)
    summary = {
        "output": result["output"],
        "steps": result["steps"],
        "final_loss": result["final_loss"],
        "sparsity": {k: v for k, v in check["sparsity"].items() if k != "per_layer"},
    }
    from accelerate import PartialState

    if not PartialState().is_main_process:  # multi-process launch: rank 0 reports
        return 0
    s = summary["sparsity"]
    human = (
        f"saved routers to {result['output']} after {result['steps']} steps; final loss {result['final_loss']:.4f}; "
        f"sparsity on training blocks: module {s['module']:.3f} (attn {s['attn']:.3f}, mlp {s['mlp']:.3f}), params {s['params']:.3f}"
    )
    emit(args, summary, human)
    return 0
