"""``skipgpt analyze``: where a routed model skips (PNG plots, an HTML token view, a markdown report)."""

from __future__ import annotations

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
    unit_interval,
    warn_if_beyond_positions,
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="plots and a report of a routed model's skipping",
        description="Per-layer attention/MLP skip rates (bars + heatmap), execution rate against token "
        "position, a token-level view of a sample text (PNG + HTML) and report.md, written into --output.",
    )
    add_model_arg(p)
    p.add_argument(
        "--dataset", default="wiki-heldout", help="ptb | wiki-heldout | calib | a local file | hub dataset"
    )
    p.add_argument("--output", required=True, help="output folder (new, or an earlier analysis folder)")
    add_hidden_alias(p, "--output", "--out")
    p.add_argument("--seq-len", type=seq_len_int, default=512, help="window length (tokens)")
    p.add_argument("--max-windows", type=positive_int, default=16, help="analyse the first N windows")
    p.add_argument("--batch-size", type=positive_int, default=2, help="windows per forward")
    p.add_argument(
        "--text",
        default=None,
        help="sample text of the token view (default: the first 48 tokens of the first window)",
    )
    p.add_argument("--max-tokens", type=positive_int, default=64, help="token view: at most this many tokens")
    p.add_argument("--threshold", type=unit_interval, default=None, help="execute iff p(execute) >= θ")
    p.add_argument(
        "--random-routing",
        type=probability,
        default=None,
        help="analyse random routing at this skip rate instead of the routers (a baseline)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-routing")
    add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import contextlib
    from pathlib import Path

    import torch

    from ..baselines.random_routing import random_override
    from ..config import SkipGPTConfig
    from ..data import load_blocks
    from ..errors import SkipGPTError
    from ..eval.analysis import analyze_routing, check_analysis_dir
    from ..loading import load_model
    from ..model import SkipGPTModel, get_skipgpt_model

    check_analysis_dir(Path(args.output))  # fail before the model loads
    model, tokenizer = load_model(args.model, threshold=args.threshold, **load_options(args))
    if not isinstance(model, SkipGPTModel):
        if args.random_routing is None:
            raise SkipGPTError(
                f"{args.model} is a dense model; analyze needs a skipgpt output folder (or --random-routing RATE)"
            )
        model = get_skipgpt_model(model, SkipGPTConfig(), base_spec=args.model)
    warn_if_beyond_positions(model, args.seq_len)
    blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.max_windows)
    sample = None
    if args.text is not None:
        ids = tokenizer(args.text, add_special_tokens=False)["input_ids"][: args.max_tokens]
        if not ids:
            raise SkipGPTError("--text gives no tokens; give a non-empty sample text")
        sample = torch.tensor(ids, dtype=torch.long)
    else:
        sample = blocks[0, : min(48, args.max_tokens)]
    ctx = (
        model.routing(override=random_override(args.random_routing, args.seed))
        if args.random_routing is not None
        else contextlib.nullcontext()
    )
    meta = {"model": args.model, "dataset": args.dataset}
    if args.random_routing is not None:
        meta["routing"] = f"random routing at {args.random_routing} (seed {args.seed})"
    with ctx:
        summary = analyze_routing(
            model, tokenizer, blocks, args.output, sample_ids=sample, batch_size=args.batch_size, meta=meta
        )
    s = summary["sparsity"]
    trend = summary["position_trend"]
    result = {
        "output": str(args.output),
        "out": str(args.output),  # the key before 0.x's renames, kept for one release
        "report": str(Path(args.output) / "report.md"),
        **{k: summary[k] for k in ("model", "dataset", "windows", "seq_len", "sparsity", "layer_skip_rates")},
        "position_trend": {m: {"first_quarter": a, "last_quarter": b} for m, (a, b) in trend.items()},
    }
    human = (
        f"wrote {args.output}/report.md with 4 PNG plots and token_view.html "
        f"({summary['windows']}×{summary['seq_len']} tokens of {args.dataset}); "
        f"skipped: module {s['module']:.3f} attn {s['attn']:.3f} mlp {s['mlp']:.3f} params {s['params']:.3f}"
    )
    emit(args, result, human)
    return 0
