"""The stage-1 loss alone: LM + KL fused (``train.fused_loss``) against the two separate losses.

    python benchmarks/loss_speed.py --out results/loss_speed.md

Forward and backward of the loss on random float32 logits of a batch (default 8×256, SmolLM2's
vocabulary of 49152), the variants alternating in one process, ``--repeats`` times; each figure
is the median. Variants: the live teacher's full KL and the teacher cache's top-k KL, each fused
and as two losses, and the plain cross-entropy alone (the loss of ``train_throughput.py``'s floor).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def variants(ids, teacher, targets):
    from skipgpt.train.fused_loss import lm_and_kl, lm_and_topk_kl
    from skipgpt.train.losses import distillation_loss, shifted_lm_loss
    from skipgpt.train.teacher_cache import topk_distillation_loss

    return {
        "live teacher, fused": lambda z: lm_and_kl(z, ids, teacher, 1.0, 1.0)[0],
        "live teacher, two losses": lambda z: shifted_lm_loss(z, ids) + distillation_loss(z, teacher),
        "top-k cache, fused": lambda z: lm_and_topk_kl(z, ids, targets, 1.0, 1.0)[0],
        "top-k cache, two losses": lambda z: shifted_lm_loss(z, ids) + topk_distillation_loss(z, targets),
        "cross-entropy alone": lambda z: shifted_lm_loss(z, ids),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/loss_speed.md")
    args = p.parse_args(argv)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)  # a caller in the same process keeps its setting


def _run(args) -> int:
    from skipgpt.outputs import atomic_path
    from skipgpt.train.teacher_cache import teacher_targets

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.seq_len, args.vocab)
    ids = torch.randint(0, args.vocab, shape[:2], generator=gen)
    teacher = torch.randn(shape, generator=gen)
    targets = teacher_targets(teacher, args.top_k)
    logits = torch.randn(shape, generator=gen)
    fns = variants(ids, teacher, targets)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            z = logits.clone().requires_grad_()
            t0 = time.perf_counter()
            loss = fn(z)
            t1 = time.perf_counter()
            loss.backward()
            times[name].append((t1 - t0, time.perf_counter() - t1))
    lines = ["| loss | forward s | backward s | total s |", "|---|---:|---:|---:|"]
    for name, ts in times.items():
        f, b = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        lines.append(f"| {name} | {f:.3f} | {b:.3f} | {f + b:.3f} |")
    settings = (
        f"random float32 logits {args.batch_size}×{args.seq_len}×{args.vocab}, top-{args.top_k} targets, "
        f"median of {args.repeats} alternating repetitions; {platform.processor() or platform.machine()}, "
        f"{args.threads} torch threads, torch {torch.__version__}"
    )
    text = (
        f"`python benchmarks/loss_speed.py {' '.join(sys.argv[1:])}`\n\n"
        + "\n".join(lines)
        + f"\n\n{settings}\n"
    )
    print(text)
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
