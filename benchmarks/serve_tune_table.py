"""The dense windows ``skipgpt serve-tune`` measured for a folder, as one Markdown table.

    .venv-serve/bin/python benchmarks/serve_tune_table.py --model runs/demo/routers --out results/serve_tune_demo.md

Measures nothing: it reads the records that ``skipgpt serve-tune`` (one per θ) wrote into the
prepared vLLM folder's config.json (``skipgpt.tuned_windows``) and writes, per forward size, each
θ's dense / routed ratio of neighbouring forwards and whether the server runs that size dense,
with each record's settings, machine and date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def render(records: list[dict]) -> str:
    sizes = sorted({int(n) for r in records for n in r["sizes"]})
    head = " | ".join(f"θ = {r['threshold']:.4g}" for r in records)
    lines = [f"| tokens per forward | {head} |", "|---:|" + "---:|" * len(records)]
    for n in sizes:
        cells = []
        for r in records:
            m, w = r["sizes"].get(str(n)), r["dense_tokens"]
            dense = w is not None and w[0] <= n <= w[1]
            cells.append("–" if m is None else f"{m['ratio']:.2f}x{' (dense)' if dense else ''}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    windows = " | ".join(
        f"{r['dense_tokens'][0]}-{r['dense_tokens'][1]}" if r["dense_tokens"] else "none" for r in records
    )
    lines.append(f"| **dense window** | {windows} |")
    notes = [
        f"θ = {r['threshold']:.6g}: `skipgpt {' '.join(r['settings']['argv'])}` on {r['date']} "
        f"({r['machine']['cpus']} CPUs, {r['machine']['platform']}; {r['settings']['rounds']} rounds of "
        f"{r['settings']['steps']} decode steps per size, {r['settings']['dtype']})"
        for r in records
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", required=True, help="skipgpt folder (its vllm/ folder) or a prepared vLLM folder"
    )
    p.add_argument("--out", required=True, help="Markdown file to write")
    args = p.parse_args(argv)
    from skipgpt.outputs import atomic_path
    from skipgpt.serving.prepare import DEFAULT_SUBDIR, is_prepared, serving_record

    folder = Path(args.model)
    folder = folder if is_prepared(folder) else folder / DEFAULT_SUBDIR
    records = sorted(serving_record(folder).get("tuned_windows") or [], key=lambda r: r["threshold"])
    if not records:
        raise SystemExit(
            f"error: {folder} has no serve-tune record; run `skipgpt serve-tune --model {args.model}`"
        )
    table = render(records)
    print(table)
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(
            f"Command: `{' '.join(['benchmarks/serve_tune_table.py', *sys.argv[1:]])}` (dense / routed seconds "
            "of neighbouring decode forwards in one vLLM engine, median; above 1: routing pays)\n\n" + table
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
