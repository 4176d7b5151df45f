"""Zero-shot table: dense vs routed (vs random routing at the same rate) on the paper's 7 tasks.

One load of a routed model gives both rows: its dense baseline is the same model with routing
off (``model.dense()``). Scores come from lm-eval (acc, acc_norm); retention = routed mean acc /
dense mean acc. Writes OUT/zeroshot.json and OUT/zeroshot.md.

    python benchmarks/zeroshot_table.py --model runs/smollm2-s25 --limit 200 --out runs/zeroshot
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt.baselines.random_routing import random_override
from skipgpt.eval.speed import machine_string
from skipgpt.eval.tables import markdown_table
from skipgpt.eval.zeroshot import PAPER_TASKS, SOURCES, evaluate_zeroshot, prepare_tasks, retention
from skipgpt.loading import load_model
from skipgpt.model import SkipGPTModel
from skipgpt.outputs import atomic_path, write_json_atomic


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def table(rows: dict[str, dict], splits: dict[str, str]) -> str:
    """One line per task + mean + retention; two columns (acc, acc_norm) per variant."""
    names = list(rows)
    lines = [{"task": t, "split": s, **{n: rows[n]["tasks"][t] for n in names}} for t, s in splits.items()]
    lines.append(
        {
            "task": "**mean**",
            "split": "",
            **{n: {"acc": r["mean_acc"], "acc_norm": r["mean_acc_norm"]} for n, r in rows.items()},
        }
    )
    columns = [("task", "task"), ("split", "split")]
    for n in names:
        columns += [
            (f"{n} acc %", lambda r, n=n: pct(r[n]["acc"])),
            (f"{n} acc_norm %", lambda r, n=n: pct(r[n]["acc_norm"])),
        ]
    text = markdown_table(lines, columns)
    dense = rows["dense"]
    extra = [
        f"| {n} | {r['sparsity']['module']:.3f} | {r['sparsity']['params']:.3f} | "
        f"{retention(r, dense)['retention']:.3f} | {retention(r, dense)['retention_acc_norm']:.3f} |"
        for n, r in rows.items()
    ]
    head = "| variant | module sparsity | param sparsity | retention (acc) | retention (acc_norm) |\n|---|---|---|---|---|"
    return text + "\n\n" + head + "\n" + "\n".join(extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a skipgpt output folder (routed), or a dense model spec")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS))
    p.add_argument("--limit", type=int, default=None, help="first K documents per task (K >= 1); default all")
    p.add_argument("--source", choices=SOURCES, default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=None, help="routed model: execute iff p(execute) >= θ")
    p.add_argument(
        "--random",
        type=float,
        nargs="?",
        const=-1.0,
        default=None,
        help="add a random-routing row at this skip rate (no value: the routed model's realised rate)",
    )
    p.add_argument("--out", default="runs/zeroshot")
    args = p.parse_args()
    if args.limit is not None and args.limit < 1:
        raise SystemExit("error: --limit must be >= 1")
    if args.random is not None and not (args.random < 0 or 0 < args.random < 1):
        raise SystemExit("error: --random must be a skip rate in (0, 1)")

    plan = prepare_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.source)
    t0 = time.time()
    model, tok = load_model(args.model, threshold=args.threshold)
    kwargs = {"limit": args.limit, "batch_size": args.batch_size}
    rows: dict[str, dict] = {}
    if isinstance(model, SkipGPTModel):
        with model.dense():
            rows["dense"] = evaluate_zeroshot(model, tok, plan, **kwargs)
        rows["routed"] = evaluate_zeroshot(model, tok, plan, **kwargs)
        rate = rows["routed"]["sparsity"]["module"]
    else:
        rows["dense"] = evaluate_zeroshot(model, tok, plan, **kwargs)
        model, rate = get_skipgpt_model(model, SkipGPTConfig(), base_spec=args.model), 0.25
    if args.random is not None:
        rate = rate if args.random < 0 else args.random
        with model.routing(override=random_override(rate, seed=0)):
            rows[f"random@{rate:.2f}"] = evaluate_zeroshot(model, tok, plan, **kwargs)
    for r in rows.values():
        r["sparsity"].pop("per_layer", None)

    out = Path(args.out)
    result = {
        "model": args.model,
        "source": plan.source,
        "limit": args.limit,
        "splits": plan.splits,
        "rows": rows,
        "retention": {n: retention(r, rows["dense"]) for n, r in rows.items() if n != "dense"},
        "seconds": round(time.time() - t0, 1),
        "machine": machine_string(),
    }
    write_json_atomic(out / "zeroshot.json", result)
    limit = f"first {args.limit} documents per task" if args.limit else "full sets"
    md = (
        f"Zero-shot (lm-eval, 0-shot) of `{args.model}`, source `{plan.source}`, {limit}.\n\n"
        + table(rows, plan.splits)
        + "\n\nacc_norm mean: tasks without acc_norm (boolq, winogrande) count their acc. "
        + f"{result['seconds']:.0f} s on {machine_string()}.\n"
    )
    with atomic_path(out / "zeroshot.md") as tmp:
        tmp.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
