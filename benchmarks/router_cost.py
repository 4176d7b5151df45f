"""What a router costs: dense vs masked vs fast for fresh routers of each width, nothing skipped.

Fresh routers start dense (``router_init="dense"``: every token executes at inference), so the
masked path is the dense computation plus the routers and the gating, and the fast path the
dense computation plus the routers and its checks: their ratios to the dense model, timed
alternately in the same run (``skipgpt.eval.speed.run_bench``), are the price of routing alone.
One row per router width and scenario; the default router is ``SkipGPTConfig().router_hidden``.

    python benchmarks/router_cost.py --widths 144,0 --out results/router_cost.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def measure(spec: str, widths: list[int], scenarios: list[str], repeats: int) -> dict:
    from skipgpt import SkipGPTConfig, get_skipgpt_model
    from skipgpt.eval.speed import run_bench
    from skipgpt.specs import load_base_model

    base, tokenizer = load_base_model(spec)
    base.eval()
    rows, machine, settings = [], None, None
    for width in widths:
        model = get_skipgpt_model(base, SkipGPTConfig(router_hidden=width), base_spec=spec)
        params = sum(p.numel() for p in model.routed_layers[0].routers.parameters())
        result = run_bench(model, tokenizer, scenarios=scenarios, repeats=repeats, progress=True)
        machine, settings = result["machine"], result["settings"]
        for sc in result["scenarios"]:
            rows.append(
                {
                    "router_hidden": width,
                    "router_params_per_layer": params,
                    "scenario": sc["name"],
                    "dense_tok_s": sc["dense_tok_s"],
                    "masked_over_dense": sc["masked_speedup"],
                    "fast_over_dense": sc["speedup"],
                    "skipped_module": sc["sparsity"]["module"],
                }
            )
        model.unwrap()
    return {"rows": rows, "machine": machine, "settings": settings, "model": spec}


def describe(width: int, default: int | None) -> str:
    shape = "linear `Linear(d, 2)`" if width == 0 else f"`Linear(d, {width}) → ReLU → Linear({width}, 2)`"
    return shape + (" (default)" if width == default else "")


def format_table(result: dict) -> str:
    from skipgpt import SkipGPTConfig

    default = SkipGPTConfig().router_hidden
    lines = [
        "| router | router params per layer | scenario | dense tok/s | masked/dense | fast/dense | skipped |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {describe(r['router_hidden'], default)} | {r['router_params_per_layer']:,} | {r['scenario']} "
            f"| {r['dense_tok_s']:.1f} | {r['masked_over_dense']:.3f} | {r['fast_over_dense']:.3f} "
            f"| {r['skipped_module']:.1%} |"
        )
    s = result["settings"]
    lines.append("")
    lines.append(
        f"Model `{result['model']}`, fresh dense-start routers (every token executes, so nothing is "
        "skipped: the ratios are the cost of routing alone). masked = every module on every token, "
        "output gated (the paper's code); fast = skipgpt's skipping path. Tokens/s against the dense "
        f"model timed alternately in the same run, {s['statistic']} of {s['repeats']} runs after "
        f"{s['warmup']} warm-up; decode: {s['decode_steps']} steps after {s['decode_context']} context "
        f"tokens ({s['cache']}). Machine: {result['machine']}."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--widths", default="144,0", help="comma-separated router widths (0: linear)")
    p.add_argument("--scenarios", default="decode_b1,decode_b8,prefill_1x1024")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the table here (markdown) and the rows beside (.json)")
    args = p.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        raise SystemExit(
            f"error: --widths takes comma-separated integers >= 0, got {args.widths!r}"
        ) from None
    if not widths or min(widths) < 0:
        raise SystemExit(f"error: --widths takes comma-separated integers >= 0, got {args.widths!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    result = measure(args.model, widths, args.scenarios.split(","), args.repeats)
    command = "python benchmarks/router_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result["command"], result["wall_s"] = command, round(time.time() - t0, 1)
    table = format_table(result) + f"\n\nCommand: `{command}` ({result['wall_s']} s)."
    print(table)
    if args.out:
        from pathlib import Path

        from skipgpt.outputs import atomic_path

        out = Path(args.out)
        with atomic_path(out) as tmp:
            tmp.write_text(table + "\n")
        with atomic_path(out.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
