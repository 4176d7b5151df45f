"""``skipgpt serve-tune``: measure where routing pays in vLLM on this machine and set the dense window.

For each forward size (decode steps of that many sequences), one in-process vLLM engine alternates
routed and dense forwards and times them (``skipgpt.serving.tune``); forwards of the sizes where
routing loses run vLLM's dense layers when served. The window and its measurement go into the
prepared folder's config.json (``skipgpt.tuned_windows``, one record per θ: the folder's or
``--threshold``); ``skipgpt serve`` at that θ uses it, ``--dense-tokens`` overrides it. Needs the serving environment.
"""

from __future__ import annotations

from .common import add_json_arg, add_model_arg, emit, positive_int, unit_interval

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from ..serving.tune import DEFAULT_SIZES

    p = sub.add_parser(
        "serve-tune",
        help="measure routed against dense vLLM forwards per batch size and set the dense window",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
    )
    add_model_arg(p)
    p.add_argument(
        "--threshold", type=unit_interval, default=None, help="θ to tune for (default: the folder's)"
    )
    p.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        help="forward sizes (tokens = sequences of a decode step) to measure",
    )
    p.add_argument("--steps", type=positive_int, default=24, help="decode steps per generation")
    p.add_argument("--rounds", type=positive_int, default=3, help="generations per size")
    p.add_argument("--dtype", default="bfloat16", help="vLLM --dtype (as `skipgpt serve`)")
    p.add_argument(
        "--prepared-dir", default=None, help="the vLLM folder (default: <model>/vllm; prepared when missing)"
    )
    p.add_argument(
        "--kv-cache-gib", type=float, default=2.0, help="GiB for the KV cache (VLLM_CPU_KVCACHE_SPACE)"
    )
    p.add_argument("--dry-run", action="store_true", help="measure and print; do not write the window")
    add_json_arg(p)
    p.set_defaults(func=run)


def _table(theta: float, results: dict[int, dict], window) -> str:
    lines = [
        f"θ = {theta:.6g}: routed against dense decode forwards (median ms, alternating forwards)",
        "| tokens | dense ms | routed ms | dense/routed | served |",
        "|---:|---:|---:|---:|---|",
    ]
    for n, r in sorted(results.items()):
        dense = window is not None and window[0] <= n <= window[1]
        lines.append(
            f"| {n} | {r['dense_ms']:.2f} | {r['routed_ms']:.2f} | {r['ratio']:.3f}x | {'dense' if dense else 'routed'} |"
        )
    where = f"forwards of {window[0]}-{window[1]} tokens run dense" if window else "every forward is routed"
    return "\n".join(lines) + f"\ndense window: {where}"


def run(args) -> int:
    import os
    import sys

    from ..errors import SkipGPTError
    from ..serving.prepare import prepare_serving_folder
    from ..serving.tune import measure, tuned_record, write_tuned_window
    from .serve import require_vllm

    require_vllm("serve-tune")
    if not args.kv_cache_gib > 0:
        raise SkipGPTError(f"--kv-cache-gib must be > 0, got {args.kv_cache_gib}")
    sizes = sorted(set(args.sizes))
    folder = prepare_serving_folder(args.model, args.prepared_dir)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = (
        "0"  # the engine in this process: the timings are read there
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{args.kv_cache_gib:g}")
    from vllm import LLM

    overrides = {"skipgpt_threshold": args.threshold} if args.threshold is not None else {}
    llm = LLM(
        model=str(folder),
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=max(sizes),
        seed=0,
        hf_overrides=overrides or None,
    )
    theta = llm.apply_model(lambda model: model.skipgpt_state.threshold)[0]
    results = measure(llm, sizes, steps=args.steps, rounds=args.rounds, progress=sys.stderr.isatty())
    settings = {"steps": args.steps, "rounds": args.rounds, "dtype": args.dtype, "argv": sys.argv[1:]}
    record = tuned_record(theta, results, settings)
    window = record["dense_tokens"]
    if not args.dry_run:
        write_tuned_window(folder, record)
    human = _table(theta, results, window) + ("" if args.dry_run else f"\nwritten to {folder}/config.json")
    emit(args, {"folder": str(folder), **record}, human)
    return 0
