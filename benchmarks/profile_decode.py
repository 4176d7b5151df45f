"""Where a decode step's time goes: torch.profiler over decode steps of dense, masked and fast.

    python benchmarks/profile_decode.py --model smollm2-135m --random-routing 0.4 --batch 8
    python benchmarks/profile_decode.py --model runs/demo-40 --batch 8 --cache static
    python benchmarks/profile_decode.py --model runs/R --threshold 0.7 --prefill --batch 1 --context 1024

``--prefill`` profiles one prefill forward of ``--batch`` × ``--context`` tokens per variant (after
one unprofiled warm-up forward) instead of decode steps: where a routed prefill's time goes against
the dense one's (the matmuls, SDPA over the packed queries, gathers and scatters).

For each variant, prints the wall time per decode step (median over the profiled steps' total,
profiler on) and the operators taking the most self CPU time, grouped by input shapes, so the
routers' GEMMs (d → R·h and R·h → 2R with fused routers) can be told from the model's. Writes
the tables to ``--out`` (markdown) when given. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import add_model_and_routing_args, load  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_and_routing_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=384)
    p.add_argument("--steps", type=int, default=32, help="profiled decode steps per variant")
    p.add_argument("--top", type=int, default=15, help="operators listed per variant")
    p.add_argument("--variants", default="dense,masked,fast")
    p.add_argument("--cache", choices=["dynamic", "static"], default="dynamic", help="HF KV cache kind")
    p.add_argument(
        "--prefill",
        action="store_true",
        help="profile one prefill forward of --batch x --context tokens instead",
    )
    p.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.context < 1:
        p.error("--batch, --steps and --context must be >= 1")

    from skipgpt import SkipGPTConfig, SkipGPTModel, get_skipgpt_model
    from skipgpt.adapters import model_cache_argument
    from skipgpt.eval.speed import CACHES, VariantRouting, machine_string, new_cache, token_pool

    model, tokenizer = load(args.model, args.threshold)
    if not isinstance(model, SkipGPTModel):
        if args.random_routing is None:
            p.error("a model without routers needs --random-routing")
        model = get_skipgpt_model(model, SkipGPTConfig())
    model.eval()
    routing = VariantRouting(model, args.random_routing, args.threshold, seed=0, router_overhead=True)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    need = args.context + args.steps + 1
    ids, source = token_pool(tokenizer, args.batch * need, vocab, 0, None)
    ids = ids.view(args.batch, need)

    what = (
        "one prefill forward after 1 warm-up forward (no cache)"
        if args.prefill
        else f"{args.steps} profiled steps after 1 warm-up step ({CACHES[args.cache]})"
    )
    lines = [
        f"{'Prefill' if args.prefill else 'Decode'} profile: {args.model}, {routing.describe()}, batch "
        f"{args.batch}, context {args.context}, {what}; input: {source}.",
        f"Machine: {machine_string()}.",
    ]
    cache_arg = model_cache_argument(model)
    for variant in args.variants.split(","):
        if args.prefill:
            prof, wall = _profile_prefill(model, routing, variant, ids[:, : args.context])
            lines += [f"\n### {variant}: {wall * 1e3:.2f} ms per prefill forward (profiler on)\n", "```"]
            lines += [_table(prof, args.top), "```"]
            continue
        with torch.inference_mode(), routing(variant):
            cache = new_cache(model, args.cache, need)
            model(input_ids=ids[:, : args.context], **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
            model(input_ids=ids[:, args.context : args.context + 1], **{cache_arg: cache}, use_cache=True)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                t0 = time.perf_counter()
                for s in range(args.steps):
                    t = args.context + 1 + s
                    model(input_ids=ids[:, t : t + 1], **{cache_arg: cache}, use_cache=True)
                wall = (time.perf_counter() - t0) / args.steps
        lines += [
            f"\n### {variant}: {wall * 1e3:.2f} ms per decode step (profiler on)\n",
            "```",
            _table(prof, args.top),
            "```",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from skipgpt.outputs import atomic_path

        with atomic_path(Path(args.out)) as tmp:
            tmp.write_text(text + "\n")
        print(f"\nwrote {args.out}")
    return 0


def _profile_prefill(model, routing, variant: str, ids: torch.Tensor):
    """(profiler, wall seconds) of one prefill forward of ``ids`` (B, T) under ``variant``."""
    with torch.inference_mode(), routing(variant):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            wall = time.perf_counter() - t0
    return prof, wall


def _table(prof, top: int) -> str:
    """The operators taking the most self CPU time, grouped by input shapes."""
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=28, max_shapes_column_width=60
    )


if __name__ == "__main__":
    sys.exit(main())
