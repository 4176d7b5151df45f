"""``skipgpt bench``: tokens/s of dense, masked (paper-code behaviour) and fast execution."""

from __future__ import annotations

import argparse

from .common import (
    add_device_args,
    add_json_arg,
    add_model_arg,
    emit,
    load_options,
    positive_int,
    probability,
    unit_interval,
)


def threshold_list(text: str) -> list[float]:
    """argparse type: comma-separated thresholds, each in [0, 1]."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give comma-separated thresholds in [0, 1], e.g. 0.5,0.6,0.7")
    return [unit_interval(t) for t in items]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed: dense vs masked vs fast, prefill and decode")
    add_model_arg(p)
    p.add_argument(
        "--threshold", type=unit_interval, default=None, help="routed model: execute iff p(execute) >= θ"
    )
    p.add_argument(
        "--random-routing",
        type=probability,
        default=None,
        help="force random routing at this skip rate (for a model without trained routers)",
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per scenario")
    p.add_argument("--scenarios", default=None, help="comma-separated subset, e.g. prefill_1x1024,decode_b1")
    g = p.add_argument_group("compute dial (trained routers)")
    g.add_argument(
        "--sweep",
        type=threshold_list,
        default=None,
        help="comma-separated θ values: per θ, realised sparsity, PPL and speedup (default scenario prefill_1x1024)",
    )
    g.add_argument("--sweep-dataset", default="wiki-heldout", help="perplexity text of --sweep")
    g.add_argument("--sweep-windows", type=positive_int, default=8, help="windows for --sweep PPL")
    g.add_argument("--sweep-seq-len", type=positive_int, default=1024, help="window length for --sweep PPL")
    add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import SkipGPTError
    from ..eval.speed import format_bench_table, run_bench
    from ..loading import load_model

    if args.sweep is not None and (args.random_routing is not None or args.threshold is not None):
        raise SkipGPTError("--sweep sets θ itself: drop --threshold and --random-routing")
    model, tokenizer = load_model(args.model, threshold=args.threshold, **load_options(args))
    scenarios = args.scenarios.split(",") if args.scenarios else None
    if args.sweep is not None:
        return _sweep(args, model, tokenizer, scenarios)
    result = run_bench(
        model,
        tokenizer,
        scenarios=scenarios,
        repeats=args.repeats,
        random_routing=args.random_routing,
        progress=True,
    )
    emit(args, result, format_bench_table(result))
    return 0


def _sweep(args, model, tokenizer, scenarios) -> int:
    from ..data import load_blocks
    from ..errors import SkipGPTError
    from ..eval.perplexity import evaluate_perplexity
    from ..eval.speed import format_sweep_table, machine_string, sweep_threshold
    from ..model import SkipGPTModel

    if not isinstance(model, SkipGPTModel):
        raise SkipGPTError(
            f"--sweep needs a skipgpt output folder with trained routers; {args.model} has none"
        )
    blocks = load_blocks(args.sweep_dataset, tokenizer, args.sweep_seq_len, max_blocks=args.sweep_windows)
    rows = sweep_threshold(
        model,
        tokenizer,
        thresholds=args.sweep,
        ppl_fn=lambda m: evaluate_perplexity(m, blocks, progress=False),
        scenarios=scenarios or ("prefill_1x1024",),
        repeats=args.repeats,
    )
    settings = (
        f"{args.model}; PPL on the first {blocks.shape[0]} windows of {args.sweep_seq_len} tokens of "
        f"{args.sweep_dataset}; "
        f"speed: median of {args.repeats} runs; machine: {machine_string()}"
    )
    emit(args, {"sweep": rows, "settings": settings}, format_sweep_table(rows) + "\n\n" + settings)
    return 0
