"""``skipgpt bench``: tokens/s of dense, masked (paper-code behaviour) and fast execution."""

from __future__ import annotations

from .common import add_json_arg, add_model_arg, emit, positive_int, probability, unit_interval


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
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--scenarios", default=None, help="comma-separated subset, e.g. prefill_1x1024,decode_b1")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.speed import format_bench_table, run_bench
    from ..loading import load_model

    model, tokenizer = load_model(args.model, threshold=args.threshold)
    scenarios = args.scenarios.split(",") if args.scenarios else None
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
