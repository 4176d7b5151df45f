"""``skipgpt baseline shortgpt|llm-drop|substitute|mod``: the static and capacity-routed baselines.

All three meet a *parameter* budget (parameters of removed/skipped attention+MLP modules over
those of all decoder layers). The static ones remove whole units and round to the nearest
achievable share (``--rounding``); MoD-D meets it by construction.
"""

from __future__ import annotations

import argparse

from .common import (
    add_device_args,
    add_hidden_alias,
    add_json_arg,
    add_model_arg,
    emit,
    load_options,
    positive_int,
    probability,
    seq_len_int,
    warn_if_beyond_positions,
)

__all__ = ["add_parser", "add_static_args", "add_mod_router_args", "mod_router_config", "mod_tuning_args"]


def add_static_args(p: argparse.ArgumentParser) -> None:
    """Calibration and budget options of the static baselines."""
    from ..baselines.scores import ROUNDINGS

    p.add_argument(
        "--target-sparsity",
        dest="sparsity",
        type=probability,
        required=True,
        help="parameter sparsity to remove, in (0, 1)",
    )
    add_hidden_alias(p, "--target-sparsity", "--sparsity")
    p.add_argument("--output", required=True, help="output folder (new, or an earlier one with --overwrite)")
    p.add_argument("--dataset", default="calib", help="calibration text: calib | a local file | hub dataset")
    p.add_argument("--seq-len", type=seq_len_int, default=256, help="calibration block length")
    p.add_argument(
        "--score-blocks", dest="calib_blocks", type=positive_int, default=32, help="number of scoring blocks"
    )
    add_hidden_alias(p, "--score-blocks", "--calib-blocks")
    p.add_argument("--batch-size", type=positive_int, default=4, help="calibration blocks per forward")
    p.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default="nearest",
        help="whole units are removed: stop at the share nearest the target (ties: fewer), "
        "the largest not above it, or the smallest not below it",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier model in --output")


MOD_ROUTER_FIELDS = ("router_hidden", "router_init", "execute_bias")
MOD_LOSS_FIELDS = ("lm_weight", "distill_weight", "distill_temperature", "calibrate_blocks")


def add_mod_router_args(p: argparse.ArgumentParser) -> None:
    """Router options of MoD-D (the budget is --target-sparsity; no sparsity weight/tau: top-k fixes the rate)."""
    from .train_router import add_router_args

    add_router_args(
        p,
        fields=MOD_ROUTER_FIELDS,
        loss_fields=MOD_LOSS_FIELDS,
        help={
            "calibrate_blocks": "after training, calibrate θ (causal threshold routing) on this many blocks "
            "(0 = skip)"
        },
    )


def mod_router_config(args) -> dict:
    """The ``SkipGPTConfig`` fields MoD-D takes from the command line."""
    return {k: getattr(args, k) for k in MOD_ROUTER_FIELDS}


def mod_tuning_args(args):
    """MoD-D's stage-1 loss: the flags, no curriculum (top-k fixes the skip rate from step 0)."""
    from .train_router import tuning_args_from_args

    return tuning_args_from_args(args, curriculum=0.0)


def add_parser(sub) -> None:
    from .train_router import add_loop_args

    p = sub.add_parser("baseline", help="build a baseline at a parameter budget: shortgpt | llm-drop | mod")
    bsub = p.add_subparsers(dest="baseline", required=True, metavar="METHOD")

    s = bsub.add_parser("shortgpt", help="ShortGPT: delete the layers of lowest Block Influence")
    add_model_arg(s)
    add_static_args(s)
    add_device_args(s)
    add_json_arg(s)
    s.set_defaults(func=run_shortgpt)

    d = bsub.add_parser("llm-drop", help="LLM-Drop: drop the attention/MLP modules of lowest importance")
    add_model_arg(d)
    add_static_args(d)
    d.add_argument(
        "--droppable", default="attn,mlp", help="which modules may be dropped: attn,mlp (joint) | attn | mlp"
    )
    add_device_args(d)
    add_json_arg(d)
    d.set_defaults(func=run_llm_drop)

    r = bsub.add_parser(
        "substitute",
        help="static substitutes: the MLPs of lowest importance replaced by closed-form low-rank fits",
    )
    add_model_arg(r)
    add_static_args(r)
    r.add_argument(
        "--rank", type=positive_int, default=None, help="rank of the substitutes (default: hidden_size // 16)"
    )
    add_json_arg(r)
    r.set_defaults(func=run_substitute)

    m = bsub.add_parser("mod", help="MoD-D: per-module top-k capacity routing, router-tuned")
    add_model_arg(m)
    m.add_argument(
        "--target-sparsity",
        dest="sparsity",
        type=probability,
        required=True,
        help="skip rate of every module = parameter sparsity",
    )
    add_hidden_alias(m, "--target-sparsity", "--sparsity")
    add_mod_router_args(m)
    add_loop_args(m)
    add_device_args(m)
    add_json_arg(m)
    m.set_defaults(func=run_mod)


def _base_and_blocks(args, units):
    from ..baselines.scores import check_budget
    from ..checkpoint import is_skipgpt_dir
    from ..data import load_blocks
    from ..errors import SkipGPTError
    from ..specs import load_base_model

    if is_skipgpt_dir(args.model):
        raise SkipGPTError(f"{args.model} is a routed model; give its base model spec to build a baseline")
    base, tokenizer = load_base_model(args.model, **load_options(args))
    check_budget(base, args.sparsity, args.rounding, units)  # before reading any text
    warn_if_beyond_positions(base, args.seq_len)
    blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.calib_blocks)
    return base.eval(), tokenizer, blocks


def _pick(s: dict) -> dict:
    return {k: round(float(s[k]), 6) for k in ("module", "attn", "mlp", "params")}


def run_shortgpt(args) -> int:
    from ..baselines.scores import check_baseline_output
    from ..baselines.shortgpt import save_pruned, shortgpt_prune

    check_baseline_output(args.output, args.overwrite)
    base, tokenizer, blocks = _base_and_blocks(args, "layers")
    record = shortgpt_prune(base, blocks, args.sparsity, rounding=args.rounding, batch_size=args.batch_size)
    record["base_model"] = args.model
    record["calibration"]["dataset"] = args.dataset
    save_pruned(base, tokenizer, args.output, record, overwrite=args.overwrite)
    result = {
        "output": str(args.output),
        "method": "shortgpt",
        "target_sparsity": args.sparsity,
        "removed_layers": record["removed_layers"],
        "num_layers": record["num_layers_after"],
        "sparsity": _pick(record["sparsity"]),
    }
    human = (
        f"ShortGPT: removed layers {record['removed_layers']} ({record['num_layers_before']} -> "
        f"{record['num_layers_after']}); parameter sparsity {record['sparsity']['params']:.4f} "
        f"(target {args.sparsity}); saved to {args.output}"
    )
    emit(args, result, human)
    return 0


def run_llm_drop(args) -> int:
    from ..baselines.llm_drop import llm_drop_prune, save_llm_drop
    from ..baselines.scores import check_baseline_output, describe_removed
    from ..config import MODULES
    from ..errors import SkipGPTError

    check_baseline_output(args.output, args.overwrite)
    droppable = [m.strip() for m in args.droppable.split(",") if m.strip()]
    if not droppable or any(m not in MODULES for m in droppable):
        raise SkipGPTError(f"--droppable must be attn,mlp | attn | mlp, got {args.droppable!r}")
    base, _, blocks = _base_and_blocks(args, tuple(droppable))
    model, record = llm_drop_prune(
        base,
        blocks,
        args.sparsity,
        base_spec=args.model,
        modules=droppable,
        rounding=args.rounding,
        batch_size=args.batch_size,
    )
    record["calibration"]["dataset"] = args.dataset
    save_llm_drop(model, args.output, record, overwrite=args.overwrite)
    removed = [tuple(x) for x in record["removed_modules"]]
    result = {
        "output": str(args.output),
        "method": "llm-drop",
        "target_sparsity": args.sparsity,
        "removed_modules": record["removed_modules"],
        "sparsity": _pick(record["sparsity"]),
    }
    s = record["sparsity"]
    human = (
        f"LLM-Drop: dropped {len(removed)} modules ({describe_removed(sorted(removed))}); "
        f"attn {s['attn']:.3f} mlp {s['mlp']:.3f}, parameter sparsity {s['params']:.4f} "
        f"(target {args.sparsity}); saved to {args.output}"
    )
    emit(args, result, human)
    return 0


def run_substitute(args) -> int:
    from ..baselines.scores import check_baseline_output
    from ..baselines.substitute import save_static_substitute, static_substitute_prune

    check_baseline_output(args.output, args.overwrite)
    base, _, blocks = _base_and_blocks(args, ("mlp",))
    model, record = static_substitute_prune(
        base,
        blocks,
        args.sparsity,
        rank=args.rank,
        base_spec=args.model,
        rounding=args.rounding,
        batch_size=args.batch_size,
    )
    record["calibration"]["dataset"] = args.dataset
    save_static_substitute(model, args.output, record, overwrite=args.overwrite)
    s = record["sparsity"]
    result = {
        "output": str(args.output),
        "method": "static-substitute",
        "target_sparsity": args.sparsity,
        "replaced_mlps": record["replaced_mlps"],
        "rank": record["rank"],
        "sparsity": {**_pick(s), "params_net": round(float(s["params_net"]), 6)},
    }
    human = (
        f"static substitutes: MLPs of layers {sorted(record['replaced_mlps'])} replaced by rank-{record['rank']} "
        f"closed-form fits; parameter sparsity {s['params_net']:.4f} net of the substitutes (target "
        f"{args.sparsity}); saved to {args.output}"
    )
    emit(args, result, human)
    return 0


def run_mod(args) -> int:
    import torch

    from ..baselines.mod import topk_routing, train_mod
    from ..checkpoint import is_skipgpt_dir
    from ..data import load_blocks
    from ..errors import SkipGPTError
    from ..eval.perplexity import evaluate_perplexity
    from ..outputs import prepare_output_dir
    from ..specs import load_base_model
    from .train_router import loop_args_from_args

    loop = loop_args_from_args(args)
    tuning = mod_tuning_args(args)
    prepare_output_dir(args.output)
    if is_skipgpt_dir(args.model):
        raise SkipGPTError(f"{args.model} is a routed model; give its base model spec to train MoD-D routers")
    torch.manual_seed(args.seed)
    base, tokenizer = load_base_model(args.model, **load_options(args))
    warn_if_beyond_positions(base, args.seq_len)
    blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.max_blocks)
    model, result = train_mod(
        base,
        blocks,
        args.sparsity,
        args.output,
        loop,
        tuning,
        base_spec=args.model,
        router_config=mod_router_config(args),
        resume=args.resume,
        overwrite=args.overwrite,
        metadata={"dataset": args.dataset, "seq_len": args.seq_len, "blocks": int(blocks.shape[0])},
    )
    check = blocks[: min(8, blocks.shape[0])]
    with topk_routing(model):
        topk = evaluate_perplexity(model, check, progress=False)["sparsity"]
    causal = evaluate_perplexity(model, check, progress=False)["sparsity"]
    summary = {
        "output": result["output"],
        "method": "mod-d",
        "steps": result["steps"],
        "final_loss": result["final_loss"],
        "threshold": model.state.threshold,
        "sparsity": _pick(topk),
        "sparsity_threshold_routing": _pick(causal),
    }
    human = (
        f"MoD-D: saved routers to {result['output']} after {result['steps']} steps; final loss "
        f"{result['final_loss']:.4f}; parameter sparsity on training blocks: top-k {topk['params']:.3f}, "
        f"θ={model.state.threshold:.4f} routing {causal['params']:.3f}"
    )
    emit(args, summary, human)
    return 0
