"""Why router trainings collapse: the residual stream's scale by layer, and how static a router set's
decisions are.

    python benchmarks/router_diagnostics.py --model smollm2-135m \\
        --routers runs/rt25-frontier-100-s1 --routers runs/rt25-frontier-100

Prints (1) the RMS of each decoder layer's input (median over tokens, and the first token's) on
``--scale-blocks`` windows of 256 wiki-heldout tokens of the base model: a raw-input linear router's
logits move in proportion to it under one optimiser step; (2) for each router set at ``--threshold``,
the skip rate of every (layer, module) on ``--windows`` windows of 1024 wiki-heldout tokens, and how
many modules are skipped by more than ``--static`` of the tokens (a collapsed set freezes into such
static choices).
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="base model spec")
    p.add_argument("--routers", action="append", default=[], help="router folder (repeatable)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--scale-blocks", type=int, default=2)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--static", type=float, default=0.95)
    args = p.parse_args(argv)

    from skipgpt.data import load_blocks
    from skipgpt.eval.perplexity import evaluate_perplexity
    from skipgpt.loading import load_model

    base, tok = load_model(args.model)
    blocks = load_blocks("wiki-heldout", tok, 256, max_blocks=args.scale_blocks)
    with torch.no_grad():
        states = base(input_ids=blocks, output_hidden_states=True).hidden_states[:-1]
    print(f"residual RMS at each layer's input ({args.model}, {blocks.shape[0]}x256 wiki-heldout tokens)")
    print("layer | median over tokens | first token")
    for i, h in enumerate(states):
        rms = h.float().pow(2).mean(-1).sqrt()
        print(f"{i} | {rms.median():.2f} | {rms[:, 0].mean():.1f}")

    for folder in args.routers:
        model, tok = load_model(folder, threshold=args.threshold)
        windows = load_blocks("wiki-heldout", tok, 1024, max_blocks=args.windows)
        result = evaluate_perplexity(model, windows, progress=False)
        per_layer = result["sparsity"]["per_layer"]
        static = [(i, m) for m, rates in per_layer.items() for i, r in enumerate(rates) if r > args.static]
        top = max(r for rates in per_layer.values() for r in rates)
        print(
            f"\n{folder} at θ {args.threshold}: wiki-heldout PPL {result['ppl']:.2f} ({windows.shape[0]}x1024), "
            f"params skipped {result['sparsity']['params']:.3f}; {len(static)} modules skipped by more than "
            f"{args.static:.0%} of the tokens {sorted(static)}; highest module skip rate {top:.3f}"
        )
        for m, rates in per_layer.items():
            print(f"  {m}: " + " ".join(f"{r:.2f}" for r in rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
