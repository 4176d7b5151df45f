"""Routed against dense vLLM in one process: the same engine and weights, routing switched per run.

    .venv-serve/bin/python benchmarks/serve_ab.py --model runs/demo/routers --out results/serve_ab_demo.json

``serve_load.py`` measures what a user sees (``skipgpt serve`` under an HTTP client), but dense and
routed run in two server processes, and on this 2-core machine one process can run 10-20% slower
than another for its whole life (thread placement, memory): a bias that no number of rounds
removes. Here one offline ``vllm.LLM`` (bf16, eager, in this process) serves both: dense is
``skipgpt_state.routing = False`` (vLLM's own Llama layers on the same weights,
``serving.vllm_llama``), routed is the folder's θ (or each ``--threshold``). For each concurrency
C, ``--rounds`` times with the variants alternating in order, it generates ``--max-tokens`` greedy
tokens (``ignore_eos``) for C prompts at once and times the whole call. Reported per (variant, C):
output tokens/s (the median of the rounds, or with ``--statistic best`` the best round), its ratio
to dense, the realised sparsity of the routed runs (modules and
parameters) and the ideal speedup (FLOPs, ``skipgpt.costs``), from the model's own counters.
Routed variants keep the dense window the served model would use at their θ (the one ``skipgpt
serve-tune`` measured for it, else ``serving.tune.DENSE_TOKENS``: forwards of those sizes run
every module, and count as nothing skipped); ``--route-all`` adds each θ with every forward
routed, the cost of routing where it cannot pay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import PROMPTS, _median_row, _window  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", required=True, help="skipgpt folder with routers (prepared for vLLM on first use)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        action="append",
        help="θ of a routed variant (repeat; default: the folder's)",
    )
    p.add_argument(
        "--route-all",
        action="store_true",
        help="also measure each θ with every forward routed (no dense window: --dense-tokens none)",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--statistic",
        choices=("median", "best"),
        default="median",
        help="tokens/s of a (variant, C) over its rounds: the median, or the best round (the least "
        "disturbed, as timeit's min: on a shared machine, other tenants only ever slow a round down)",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="results/serve_ab.json")
    args = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: apply_model reaches it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from skipgpt.serving.prepare import prepare_serving_folder, serving_record
    from skipgpt.serving.tune import DENSE_TOKENS, served_window

    folder = prepare_serving_folder(args.model)
    llm = LLM(
        model=str(folder),
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=max(args.concurrency),
        seed=0,
    )
    theta0 = llm.apply_model(lambda m: m.skipgpt_state.threshold)[0]
    entry = serving_record(folder)

    def window_of(theta):  # as the served model: `skipgpt serve-tune`'s window for θ, else the default
        return served_window(entry, theta)

    def label(theta, w):
        return f"routed θ={theta:.4g}" + (f", {w[0]}-{w[1]} tokens dense" if w else ", every forward routed")

    # (name, θ or None for dense, dense window); θ's window, and with --route-all also no window
    variants = [("dense", None, None)]
    for t in args.threshold or [theta0]:
        windows = [window_of(t), None] if args.route_all and window_of(t) else [window_of(t)]
        variants += [(label(t, w), t, w) for w in windows]

    def use(theta, w):
        def apply(m):
            m.skipgpt_state.routing = theta is not None
            m.skipgpt_state.dense_tokens = w
            if theta is not None:
                m.skipgpt_state.threshold = theta

        llm.apply_model(apply)

    def stats():
        return llm.apply_model(lambda m: m.skipgpt_state.stats())[0]

    sampling = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    runs: dict[tuple[str, int], list[dict]] = {}
    for c in args.concurrency:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(c)]
        for _, theta, w in variants:  # warm-up
            use(theta, w)
            llm.generate(prompts, sampling, use_tqdm=False)
        for r in range(args.rounds):
            for name, theta, w in variants if r % 2 == 0 else variants[::-1]:
                use(theta, w)
                before = stats()
                start = time.perf_counter()
                outs = llm.generate(prompts, sampling, use_tqdm=False)
                wall = time.perf_counter() - start
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                row = {"variant": name, "concurrency": c, "round": r, "output_tok_s": tokens / wall}
                if theta is not None:
                    row.update(_window(before, stats()))
                runs.setdefault((name, c), []).append(row)
                print(json.dumps(row), flush=True)
    lines = [
        f"| variant | C | out tok/s ({args.statistic}) | vs dense | rounds (tok/s) | skipped (modules / params) | ideal |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    rows = []
    pick = max if args.statistic == "best" else statistics.median
    for c in args.concurrency:
        dense = pick(r["output_tok_s"] for r in runs[("dense", c)])
        for name, _, _ in variants:
            row = _median_row(runs[(name, c)])
            tps = row["output_tok_s"] = pick(row["rounds_output_tok_s"])
            row["vs_dense"] = tps / dense
            rows.append(row)
            sp = (
                f"{row['realised_sparsity']:.1%} / {row['realised_sparsity_params']:.1%}"
                if "realised_sparsity" in row
                else "0% / 0%"
            )
            lines.append(
                f"| {name} | {c} | {tps:.1f} | {tps / dense:.2f}x | "
                f"{', '.join(f'{v:.1f}' for v in row['rounds_output_tok_s'])} | {sp} | "
                f"{row.get('ideal_speedup', 1.0):.2f}x |"
            )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    record = {
        "argv": sys.argv,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": vars(args),
        "rows": rows,
        "rounds": [r for rs in runs.values() for r in rs],
    }
    from skipgpt.outputs import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    windowing = (
        "; a routed variant runs the forwards of its dense window's sizes dense (the window "
        f"`skipgpt serve-tune` measured for its θ, else the default {DENSE_TOKENS[0]}-{DENSE_TOKENS[1]})"
    )
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(
            f"Command: `{' '.join(sys.argv)}` ({os.cpu_count()} CPUs; one vLLM engine in one process, dense = "
            f"routing off on the same weights; {args.statistic} of {args.rounds} rounds, variants alternating; "
            f"{args.max_tokens} greedy tokens per prompt, C prompts at once{windowing})\n\n" + table + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
