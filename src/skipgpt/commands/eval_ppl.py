"""``skipgpt eval ppl``: perplexity of a dense or routed model, with the sparsity it realised."""

from __future__ import annotations

from .common import (
    add_device_args,
    add_json_arg,
    add_model_arg,
    emit,
    load_options,
    positive_int,
    probability,
    seq_len_int,
    unit_interval,
    warn_if_beyond_positions,
)


def add_parser(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity on non-overlapping windows")
    add_model_arg(p)
    p.add_argument(
        "--dataset", default="wiki-heldout", help="ptb | wiki-heldout | calib | a local file | hub dataset"
    )
    p.add_argument("--seq-len", type=seq_len_int, default=1024, help="window length (tokens)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="windows per forward")
    p.add_argument("--max-windows", type=positive_int, default=None, help="evaluate only the first N windows")
    p.add_argument(
        "--threshold", type=unit_interval, default=None, help="routed model: execute iff p(execute) >= θ"
    )
    p.add_argument(
        "--dense", action="store_true", help="routed model: switch routing off (every module runs)"
    )
    p.add_argument(
        "--random-routing",
        type=probability,
        default=None,
        help="replace the routers by random routing at this skip rate (a baseline)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-routing")
    add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import contextlib

    from ..baselines.random_routing import random_override
    from ..config import SkipGPTConfig
    from ..data import load_blocks
    from ..eval.perplexity import evaluate_perplexity
    from ..loading import load_model
    from ..model import get_skipgpt_model

    model, tokenizer = load_model(args.model, threshold=args.threshold, **load_options(args))
    if args.random_routing is not None and not hasattr(model, "routing"):
        model = get_skipgpt_model(model, SkipGPTConfig(), base_spec=args.model)
    warn_if_beyond_positions(model, args.seq_len)
    blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.max_windows)
    if args.dense and hasattr(model, "dense"):
        ctx = model.dense()
    elif args.random_routing is not None:
        ctx = model.routing(override=random_override(args.random_routing, args.seed))
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        result = evaluate_perplexity(model, blocks, batch_size=args.batch_size, desc=f"ppl {args.dataset}")
    result = {"model": args.model, "dataset": args.dataset, **result}
    result["sparsity"].pop("per_layer", None)
    removed = _static_removal(args.model)
    if removed is not None:  # a ShortGPT folder: no routing, layers really gone
        result["sparsity"] = removed
        result["static"] = True
    s = result["sparsity"]
    human = (
        f"{args.dataset}: ppl {result['ppl']:.3f} over {result['tokens']} tokens ({result['windows']}×{result['seq_len']}); "
        f"sparsity module {s['module']:.3f} attn {s['attn']:.3f} mlp {s['mlp']:.3f} params {s['params']:.3f}"
    )
    emit(args, result, human)
    return 0


def _static_removal(spec: str) -> dict | None:
    """Sparsity of a ShortGPT output folder (its layers are removed, not routed), else None."""
    from .. import checkpoint

    try:
        if not checkpoint.is_output_dir(spec) or checkpoint.is_skipgpt_dir(spec):
            return None
    except (OSError, ValueError):  # a model spec that is no path
        return None
    record = checkpoint.read(spec)
    return record.metadata["sparsity"] if record.kind == "shortgpt" else None
