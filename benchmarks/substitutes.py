"""Skip to nothing vs skip to a closed-form substitute, statically, no training (issue 18).

On SmolLM2-135M: the MLPs of some layers (default 12-17) removed, or replaced by rank-r
reduced-rank least-squares fits of themselves (``skipgpt.substitutes``, fitted on ~8K tokens
of the built-in calibration text), against dense. Reports PTB test PPL on ``--windows``
windows of ``--seq-len`` tokens, the parameter sparsity net of the substitutes, the
substitutes' relative fit error, and the ideal prefill speedup of one 1x1024 forward
(``costs.routing_cost``, substitutes charged). Writes OUT.json and OUT.md.

    OMP_NUM_THREADS=1 python benchmarks/substitutes.py --windows 6 --out results/substitutes
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt.baselines.llm_drop import set_static_routers
from skipgpt.baselines.substitute import build_static_substitute
from skipgpt.costs import CostModel, ForwardRecord, routing_cost
from skipgpt.data import load_blocks
from skipgpt.eval.perplexity import evaluate_perplexity
from skipgpt.specs import load_base_model


def variant_row(model, name: str, blocks: torch.Tensor, layers: list[int], batch_size: int) -> dict:
    t0 = time.perf_counter()
    ppl = evaluate_perplexity(model, blocks, batch_size=batch_size, progress=False)
    row = {"variant": name, "ppl": ppl["ppl"], "eval_s": round(time.perf_counter() - t0, 1)}
    if hasattr(model, "sparsity_stats"):
        stats = model.sparsity_stats()
        row["params_sparsity"] = stats["params"]
        row["params_sparsity_net"] = stats["params_net"]
        n = model.state.num_layers
        execute = {(i, "mlp"): torch.full((1, 1024), i not in layers) for i in range(n)}
        row["ideal_prefill_speedup"] = routing_cost(
            CostModel.for_model(model), [ForwardRecord(batch=1, length=1024, execute=execute)]
        )["ideal_speedup"]
    else:
        row.update(params_sparsity=0.0, params_sparsity_net=0.0, ideal_prefill_speedup=1.0)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="12,13,14,15,16,17", help="layers whose MLP is removed / replaced")
    p.add_argument("--ranks", default="36,144")
    p.add_argument("--windows", type=int, default=6, help="PTB test windows")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", default="results/substitutes")
    args = p.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    torch.manual_seed(0)
    base, tok = load_base_model(args.model)
    base.eval()
    blocks = load_blocks("ptb", tok, args.seq_len, max_blocks=args.windows)
    calib = load_blocks("calib", tok, 256, max_blocks=math.ceil(args.calib_tokens / 256))
    rows = []
    with torch.no_grad():
        rows.append(variant_row(base, "dense", blocks, layers, args.batch_size))
        removed = get_skipgpt_model(
            base, SkipGPTConfig(router_hidden=0, modules=("mlp",)), base_spec=args.model
        )
        set_static_routers(removed, [(i, "mlp") for i in layers])
        rows.append(variant_row(removed.eval(), "MLPs removed", blocks, layers, args.batch_size))
        base = removed.unwrap()
    for r in [int(x) for x in args.ranks.split(",")]:
        t0 = time.perf_counter()
        model, fit = build_static_substitute(base, layers, calib, rank=r, base_spec=args.model)
        fit_s = time.perf_counter() - t0
        with torch.no_grad():
            row = variant_row(
                model, f"MLPs -> rank-{r} closed-form substitutes", blocks, layers, args.batch_size
            )
        row.update(fit_s=round(fit_s, 1), fit_tokens=fit["tokens"], fit_relative_error=fit["relative_error"])
        rows.append(row)
        base = model.unwrap()
    cost = CostModel.from_config(base.config)
    result = {
        "model": args.model,
        "layers": layers,
        "eval": f"PTB test, {blocks.shape[0]} windows x {blocks.shape[1]} tokens",
        "calibration": f"built-in calib text, {args.calib_tokens} tokens max (blocks of 256)",
        "mlp_flops_per_token": cost.mlp,
        "rows": rows,
        "host": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Skip to nothing vs to a closed-form substitute ({args.model}, MLPs of layers {layers[0]}-{layers[-1]})",
        "",
        f"{result['eval']}; substitutes fitted on {result['calibration']}. No training.",
        "",
        "| variant | PTB PPL | params skipped | net of substitutes | ideal prefill speedup (1x1024) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['ppl']:.2f} | {row['params_sparsity']:.2%} | "
            f"{row['params_sparsity_net']:.2%} | {row['ideal_prefill_speedup']:.3f}x |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
