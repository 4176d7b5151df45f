"""``skipgpt train-router``: stage 1, tune the routers of a frozen model."""

from __future__ import annotations

import argparse
import sys

from .common import (
    add_config_arg,
    add_device_args,
    add_json_arg,
    add_model_arg,
    emit,
    load_options,
    positive_int,
    seq_len_int,
    warn_if_beyond_positions,
)

# after training: the routed and dense PPL on this many training blocks; a routed PPL above
# COLLAPSE_RATIO times the dense one is reported as a likely collapsed training (the frontier's
# collapsed sets: 11-100x on held-out text, a seed-2 set 125x on these blocks; the good ones at
# their trained target: 1.2-2.7x)
CHECK_BLOCKS = 8
COLLAPSE_RATIO = 5.0

# Which fields of the library's dataclasses are flags here; their defaults are the fields'
# defaults, i.e. the default recipe (``skipgpt.train.recipes``).
ROUTER_FIELDS = (
    "target_sparsity budget sparsity_weight tau_start tau_end router_hidden router_init execute_bias "
    "modules mlp_router_input router_norm threshold attn_skip_to mlp_skip_to substitute_rank substitute_init "
    "substitute_activation"
).split()
LOSS_FIELDS = (
    "lm_weight",
    "distill_weight",
    "distill_temperature",
    "curriculum",
    "calibrate_blocks",
    "teacher_cache",
    "teacher_cache_dir",
)
LOOP_FIELDS = (
    "max_steps batch_size grad_accum lr lr_scheduler warmup_ratio seed save_every mixed_precision "
    "gradient_checkpointing keep_checkpoint"
).split()
MIXED_PRECISION_HELP = (
    "autocast the forward (bf16 on CPU or recent GPUs, fp16 on GPUs); routers stay fp32. auto: the "
    "accelerate launch setting if any, else bf16 where the hardware multiplies bf16 natively (a CPU "
    "with AVX-512 BF16 or AMX, a GPU with bf16), else no (default: %(default)s)"
)


def add_router_args(p: argparse.ArgumentParser, fields=None, loss_fields=None, help=None) -> None:
    """Router and stage-1 loss options (shared with commands that tune routers, e.g. baselines):
    the command-line fields of ``SkipGPTConfig`` and ``RouterTuningArgs``."""
    from ..config import SkipGPTConfig
    from ..train.router_tuning import RouterTuningArgs
    from .dataclass_args import add_dataclass_args

    g = p.add_argument_group("routers and loss")
    add_dataclass_args(g, SkipGPTConfig, ROUTER_FIELDS if fields is None else fields, help=help)
    add_dataclass_args(g, RouterTuningArgs, LOSS_FIELDS if loss_fields is None else loss_fields, help=help)


def add_recipe_arg(p: argparse.ArgumentParser, default: str | None = None) -> None:
    from ..train.recipes import DEFAULT_RECIPE, RECIPES

    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=default or DEFAULT_RECIPE,
        help="named recipe whose settings replace the defaults of the router, loss and loop options "
        "not given: "
        + "; ".join(f"{name}: {r.description}" for name, r in RECIPES.items()).replace("%", "%%")
        + " (default: %(default)s)",
    )


def add_loop_options(p, fields=LOOP_FIELDS, defaults=None) -> None:
    """The ``LoopArgs`` flags of ``fields`` (``--mixed-precision`` defaults to the launcher's)."""
    from ..train.loop import LoopArgs
    from .dataclass_args import add_dataclass_args

    defaults = {"mixed_precision": "auto", **(defaults or {})}
    add_dataclass_args(p, LoopArgs, fields, defaults=defaults, help={"mixed_precision": MIXED_PRECISION_HELP})


def add_loop_args(p: argparse.ArgumentParser, defaults=None) -> None:
    """Data, ``LoopArgs`` and output-folder options of a training command; ``defaults``: the
    ``LoopArgs`` fields whose default differs for it (e.g. stage 2's learning rate)."""
    g = p.add_argument_group("data and optimisation")
    g.add_argument(
        "--dataset",
        default="calib",
        help="calib | wiki-heldout | ptb | a .txt/.jsonl/.parquet file or folder | hub dataset",
    )
    g.add_argument("--seq-len", type=seq_len_int, default=256, help="training block length (tokens)")
    g.add_argument(
        "--max-blocks", type=positive_int, default=None, help="use at most this many blocks of the dataset"
    )
    add_loop_options(g, [*LOOP_FIELDS, "report_to"], defaults=defaults)
    g.add_argument(
        "--output", required=True, help="output folder (new, or an earlier skipgpt output with --resume)"
    )
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    g.add_argument("--overwrite", action="store_true", help="replace a finished model in --output")


# Block Influence of --remove-layers is scored on the first this many training blocks (as the
# frontier scores its ShortGPT line on its first --calib-blocks blocks, 32 by default)
REMOVAL_BLOCKS = 32


def add_parser(sub) -> None:
    p = sub.add_parser("train-router", help="stage 1: tune routers on a frozen model")
    add_model_arg(p)
    add_recipe_arg(p)
    add_router_args(p)
    p.add_argument(
        "--remove-layers",
        type=int,
        default=0,
        metavar="K",
        help="first delete the K decoder layers of lowest Block Influence (ShortGPT, scored on the first "
        f"{REMOVAL_BLOCKS} training blocks), then tune routers on the rest against the full model as "
        "teacher; the deleted layers count as skipped in --target-sparsity (default: %(default)s)",
    )
    p.add_argument(
        "--protect",
        type=int,
        default=0,
        metavar="K",
        help="never route the K most important modules (LLM-Drop's 1 - cos(input, output) on the first "
        f"{REMOVAL_BLOCKS} training blocks): their routers are constant (execute) and do not train; a guard "
        "against the trainings that collapse by skipping critical modules (default: %(default)s)",
    )
    add_loop_args(p)
    add_device_args(p)
    add_config_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def apply_recipe(args) -> None:
    """Set, in ``args``, the settings in which ``args.recipe`` differs from the default recipe,
    except those given on the command line (which win)."""
    from ..config import SkipGPTConfig
    from ..train.loop import LoopArgs
    from ..train.recipes import get_recipe
    from ..train.router_tuning import RouterTuningArgs
    from .common import options_given
    from .dataclass_args import cli_fields, dest_of

    recipe = get_recipe(getattr(args, "recipe", None) or "default")
    given = options_given(args)
    for ours, default in (
        (recipe.router, SkipGPTConfig()),
        (recipe.tuning, RouterTuningArgs()),
        (recipe.loop, LoopArgs()),
    ):
        for f in cli_fields(type(ours)):
            value, dest = getattr(ours, f.name), dest_of(f)
            if value != getattr(default, f.name) and dest not in given and hasattr(args, dest):
                setattr(args, dest, ",".join(value) if isinstance(value, tuple) else value)


def router_config_from_args(args, **changes):
    """The ``SkipGPTConfig`` of the router flags (a field without a flag: its default)."""
    from ..config import SkipGPTConfig
    from .dataclass_args import dataclass_from_args

    return dataclass_from_args(SkipGPTConfig, args, **changes)


def loop_args_from_args(args, **changes):
    """The ``LoopArgs`` of the loop flags; ``--mixed-precision auto`` (the default) resolves to what
    ``accelerate launch`` asked for, else to bf16 where it runs natively, else no."""
    from ..train.loop import LoopArgs
    from .dataclass_args import dataclass_from_args

    precision = getattr(args, "mixed_precision", None) or "auto"
    return dataclass_from_args(LoopArgs, args, **{"mixed_precision": precision, **changes})


def tuning_args_from_args(args, **changes):
    """The ``RouterTuningArgs`` of the stage-1 loss flags."""
    from ..train.router_tuning import RouterTuningArgs
    from .dataclass_args import dataclass_from_args

    return dataclass_from_args(RouterTuningArgs, args, **changes)


def run(args) -> int:
    import shlex

    import torch

    from ..checkpoint import LAYER_REMOVAL_KEY, is_skipgpt_dir
    from ..data import load_blocks
    from ..errors import SkipGPTError
    from ..model import get_skipgpt_model
    from ..specs import load_base_model
    from ..train.loop import claim_output_dir
    from ..train.router_tuning import train_routers

    apply_recipe(args)
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
    base, tokenizer = load_base_model(args.model, **load_options(args))
    warn_if_beyond_positions(base, args.seq_len)
    blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.max_blocks)
    removal = _layer_removal(base, blocks, args.remove_layers, config) if args.remove_layers else None
    protection = None
    if args.protect:
        protection = _protection(base, blocks, args.protect, config)
        config = config.replace(protected_modules=protection["modules"])  # pairs checked there
    model = get_skipgpt_model(base, config, base_spec=args.model)
    if removal is not None:
        from ..config import MODULES
        from ..removal import apply_removal

        apply_removal(model, [(i, m) for i in removal["removed_layers"] for m in MODULES])
    result = train_routers(
        model,
        blocks,
        args.output,
        loop,
        tuning,
        resume=args.resume,
        overwrite=args.overwrite,
        metadata={
            "dataset": args.dataset,
            "seq_len": args.seq_len,
            "blocks": int(blocks.shape[0]),
            "command": shlex.join(["skipgpt", *(getattr(args, "argv", None) or ["train-router"])]),
            **({LAYER_REMOVAL_KEY: removal} if removal is not None else {}),
            **({"protection": protection} if protection is not None else {}),
        },
    )
    # Realised sparsity and PPL of the final routers (deterministic routing) on a few training
    # blocks, beside the dense model's PPL there: a collapsed training shows as a large ratio.
    from ..eval.perplexity import evaluate_perplexity

    few = blocks[: min(CHECK_BLOCKS, blocks.shape[0])]
    check = evaluate_perplexity(model, few, progress=False)
    with model.dense():
        dense_ppl = evaluate_perplexity(model, few, progress=False)["ppl"]
    summary = {
        "output": result["output"],
        "steps": result["steps"],
        "final_loss": result["final_loss"],
        "sparsity": {k: v for k, v in check["sparsity"].items() if k != "per_layer"},
        "ppl": check["ppl"],
        "dense_ppl": dense_ppl,
        "check_blocks": int(few.shape[0]),
    }
    from accelerate import PartialState

    if not PartialState().is_main_process:  # multi-process launch: rank 0 reports
        return 0
    s = summary["sparsity"]
    ratio = summary["ppl"] / summary["dense_ppl"]
    human = (
        f"saved routers to {result['output']} after {result['steps']} steps; final loss {result['final_loss']:.4f}; "
        f"on {summary['check_blocks']} training blocks: sparsity module {s['module']:.3f} (attn {s['attn']:.3f}, "
        f"mlp {s['mlp']:.3f}), params {s['params']:.3f}; PPL {summary['ppl']:.2f} routed, "
        f"{summary['dense_ppl']:.2f} dense ({ratio:.2f}x)"
    )
    emit(args, summary, human)
    if ratio > COLLAPSE_RATIO:
        print(collapse_warning(ratio), file=sys.stderr)
    return 0


def collapse_warning(ratio: float) -> str:
    """What ``train-router`` says when the routed PPL on its check blocks is ``ratio`` times the
    dense model's, above ``COLLAPSE_RATIO``."""
    return (
        f"warning: the routed model's PPL on training blocks is {ratio:.1f}x the dense model's: the "
        "training has likely collapsed (README, Frontier: 'a warning about seeds'); train again with "
        "--protect 6 (the most important modules never routed), another --seed or a lower --target-sparsity"
    )


def _protection(base, blocks, k: int, config) -> dict:
    """The ``k`` routed modules of highest LLM-Drop importance on the first training blocks, as
    recorded in the folder's metadata (``protection``)."""
    from ..baselines.llm_drop import module_importance
    from ..errors import SkipGPTError

    routed = base.config.get_text_config(decoder=True).num_hidden_layers * len(config.modules)
    if not 0 < k < routed:
        raise SkipGPTError(f"--protect must be in 1..{routed - 1} (the model's routed modules), got {k}")
    calib = blocks[:REMOVAL_BLOCKS]
    scores = {pair: s for pair, s in module_importance(base, calib).items() if pair[1] in config.modules}
    chosen = sorted(scores, key=scores.get, reverse=True)[:k]
    return {
        "method": "llm-drop importance (1 - cos(input, output))",
        "modules": [[int(i), m] for i, m in sorted(chosen)],
        "importance": {f"{i}.{m}": round(float(v), 6) for (i, m), v in sorted(scores.items())},
        "calibration": {"blocks": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
    }


def _layer_removal(base, blocks, k: int, config) -> dict:
    """ShortGPT's choice of ``k`` layers to delete before router tuning, as recorded in the
    folder's metadata (``checkpoint.LAYER_REMOVAL_KEY``)."""
    from ..baselines.scores import unit_params
    from ..baselines.shortgpt import lowest_influence_layers
    from ..errors import SkipGPTError

    per_layer, total = unit_params(base, "layers")
    n = len(per_layer)
    if not 0 < k < n:
        raise SkipGPTError(f"--remove-layers must be in 1..{n - 1} (the model has {n} layers), got {k}")
    smallest = sum(sorted(per_layer.values())[:k]) / total  # params budget: at least this share
    share = smallest if config.budget == "params" else k / n
    if share > config.target_sparsity:
        raise SkipGPTError(
            f"--remove-layers {k} already skips {share:.3f} of the {config.budget}, more than "
            f"--target-sparsity {config.target_sparsity}; give a larger target or fewer layers"
        )
    calib = blocks[:REMOVAL_BLOCKS]
    removed, bi = lowest_influence_layers(base, calib, k)
    return {
        "method": "shortgpt",
        "removed_layers": sorted(removed),
        "removal_order": removed,
        "block_influence": bi,
        "calibration": {"blocks": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
    }
