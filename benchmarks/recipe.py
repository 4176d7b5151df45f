"""Router-tuning recipe ablation on one model at one target, with a fixed token budget.

Each variant trains routers from scratch with the same data, steps and batch, then reports
realised module/parameter sparsity (deterministic routing, calibrated θ unless
--no-calibrate), PTB and wiki-heldout perplexity, and wall time. Writes OUT/recipe.{json,md}.

    python benchmarks/recipe.py --steps 150 --batch-size 8 --out runs/recipe
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt.data import load_blocks
from skipgpt.eval.perplexity import evaluate_perplexity
from skipgpt.eval.tables import markdown_table
from skipgpt.io import atomic_path, write_json_atomic
from skipgpt.specs import load_base_model
from skipgpt.train.loop import LoopArgs
from skipgpt.train.router_tuning import RouterTuningArgs, train_routers

# name -> (router config changes, stage-1 loss changes)
VARIANTS = {
    "paper": ({"router_init": "paper"}, {}),
    "dense-init": ({}, {}),
    "dense-init+curriculum": ({}, {"curriculum": 0.3}),
    "dense-init+distill": ({}, {"distill_weight": 1.0}),
    "dense-init+distill+curriculum": ({}, {"distill_weight": 1.0, "curriculum": 0.3}),
    "distill-only+curriculum": ({}, {"distill_weight": 1.0, "lm_weight": 0.0, "curriculum": 0.3}),
    "distill+curriculum, mlp router post-attn": (
        {"mlp_router_input": "post_attention"},
        {"distill_weight": 1.0, "curriculum": 0.3},
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--budget", choices=["modules", "params"], default="modules")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    p.add_argument(
        "--no-calibrate", action="store_true", help="keep θ = 0.5 instead of calibrating it to the target"
    )
    p.add_argument("--out", default="runs/recipe")
    args = p.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; accepted: {list(VARIANTS)}")

    out = Path(args.out)
    base, tok = load_base_model(args.model)
    train = load_blocks("calib", tok, args.seq_len)
    evalsets = {
        d: load_blocks(d, tok, args.eval_seq_len, max_blocks=args.eval_windows)
        for d in ("wiki-heldout", "ptb")
    }
    rows = []
    dense = {d: evaluate_perplexity(base, b, desc=f"dense {d}")["ppl"] for d, b in evalsets.items()}
    rows.append(
        {"variant": "dense", "module": 0.0, "params": 0.0, **{f"{d} ppl": v for d, v in dense.items()}}
    )
    for name in names:
        config_changes, tuning_changes = VARIANTS[name]
        config = SkipGPTConfig(target_sparsity=args.target, budget=args.budget, **config_changes)
        model = get_skipgpt_model(base, config, base_spec=args.model)
        torch.manual_seed(0)
        t0 = time.time()
        tuning = RouterTuningArgs(calibrate_blocks=0 if args.no_calibrate else 16, **tuning_changes)
        loop = LoopArgs(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr)
        result = train_routers(
            model, train, out / name.replace(" ", "_").replace(",", ""), loop, tuning, overwrite=True
        )
        wall = time.time() - t0
        row = {"variant": name, "train s": wall, "final lm": result["history"][-1].get("lm", float("nan"))}
        for d, blocks in evalsets.items():
            r = evaluate_perplexity(model, blocks, desc=f"{name} {d}")
            row[f"{d} ppl"] = r["ppl"]
            row.update({k: r["sparsity"][k] for k in ("module", "attn", "mlp", "params")})
        row["threshold"] = model.state.threshold
        rows.append(row)
        print(json.dumps(row), flush=True)
        base = model.unwrap()

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    settings = (
        f"{args.model}, target {args.target} ({args.budget}), {args.steps} steps × {args.batch_size}×{args.seq_len} "
        f"calib tokens per variant, lr {args.lr}; PPL on the first {args.eval_windows} windows of "
        f"{args.eval_seq_len} tokens; sparsity measured on PTB; θ {'0.5' if args.no_calibrate else 'calibrated'}; {machine}"
    )
    table = markdown_table(
        rows,
        [
            ("variant", "variant"),
            ("module sp.", "module"),
            ("attn", "attn"),
            ("mlp", "mlp"),
            ("param sp.", "params"),
            ("θ", "threshold"),
            ("wiki-heldout PPL", "wiki-heldout ppl"),
            ("PTB PPL", "ptb ppl"),
            ("train s", "train s"),
        ],
    )
    write_json_atomic(out / "recipe.json", {"rows": rows, "settings": settings})
    with atomic_path(out / "recipe.md") as tmp:
        tmp.write_text(table + "\n\n" + settings + "\n")
    print(table + "\n\n" + settings)


if __name__ == "__main__":
    main()
