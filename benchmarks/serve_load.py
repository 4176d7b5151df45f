"""Load benchmark of ``skipgpt serve``: dense vs routed vLLM on 127.0.0.1, bounded, stops by itself.

    .venv-serve/bin/python benchmarks/serve_load.py --model runs/rt100-m25 --model runs/rt100-m40 \\
        --out results/serve_load.json

For each variant (``dense``: the first model's base weights on vLLM's stock Llama; then every
``--model`` routed at its own θ) it starts ``skipgpt serve`` (bf16, eager), all servers at once;
then ``--rounds`` times, for each concurrency C in ``--concurrency`` and each variant (their order
alternating between rounds), it sends ``--requests`` streamed completions (``--max-tokens`` output
tokens each, greedy, ``ignore_eos``) with C in flight. Reported per (variant, C), the median over
the rounds of: output tokens/s (all output tokens / wall time of the batch), TTFT p50/p99,
inter-token latency p50/p99 (gaps between streamed chunks of one request), and for routed variants
the realised sparsity (skipped / routed decisions over all tokens the server computed in that
window, prompts included) and the ideal speedup (dense FLOPs / (dense - skipped FLOPs), ``skipgpt.costs``
recipe; it counts the attention a skipping query saves, which vLLM's attention op still computes).
Both come from the server's ``--stats-file``. Client and server share this machine's cores.

A server process keeps the speed it starts with (on 2 shared cores two servers of the same model
differ by up to ~7% for their whole life), so one run's ratio carries that bias. ``--server-lives K``
repeats the whole run K times with fresh server processes; "vs dense" is then the median over lives
of each life's ratio (its rounds' median tokens/s against its own dense server's), with the lives'
range beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in simple words how a refrigerator keeps food cold.",
    "List some tips for learning a new language as an adult, and explain each one.",
    "Describe the water cycle, from evaporation to precipitation.",
    "What are the main differences between a cat and a dog as pets?",
    "Write a letter to a friend describing your last holiday by the sea.",
    "Explain why the sky is blue during the day and red at sunset.",
    "Give a recipe for a simple vegetable soup, step by step.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Server:
    """``skipgpt serve`` in a subprocess; ``with`` waits for /health and stops it afterwards."""

    def __init__(self, model: str, dense: bool, stats: Path | None, log: Path, args):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "skipgpt", "serve", "--model", model, "--port", str(self.port)]
        cmd += ["--served-model-name", "m", "--max-num-seqs", str(max(args.concurrency))]
        cmd += ["--max-model-len", "1024", "--dtype", args.dtype]
        cmd += ["--dense"] if dense else ["--stats-file", str(stats)]
        self.cmd, self.log, self.timeout = cmd, log, args.startup_timeout
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}

    def __enter__(self):
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.__exit__()
        raise SystemExit(f"server not up after {self.timeout} s; see {self.log}")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


async def _one(client, prompt: str, max_tokens: int, timeout: float) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.completions.create(
        model="m",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        timeout=timeout,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - start if stamps else float("nan"), "gaps": gaps, "tokens": tokens}


async def _batch(url: str, n: int, concurrency: int, max_tokens: int, timeout: float) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def run(i):
        async with sem:
            return await _one(client, PROMPTS[i % len(PROMPTS)], max_tokens, timeout)

    start = time.perf_counter()
    results = await asyncio.gather(*(run(i) for i in range(n)))
    wall = time.perf_counter() - start
    await client.close()
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["gaps"]]
    return {
        "requests": n,
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "ttft_p50_ms": 1e3 * _percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * _percentile(ttft, 0.99),
        "itl_p50_ms": 1e3 * _percentile(itl, 0.5),
        "itl_p99_ms": 1e3 * _percentile(itl, 0.99),
    }


def _stats(url: str, path: Path | None, interval: float) -> dict | None:
    """The server's routing counters, flushed by one 1-token request after the write interval."""
    if path is None:
        return None
    time.sleep(interval + 0.1)
    asyncio.run(_batch(url, 1, 1, 1, 60))
    return json.loads(path.read_text())


def _window(before: dict | None, after: dict | None) -> dict:
    if before is None or after is None:
        return {}
    d = {k: after[k] - before[k] for k in ("decisions", "skipped_decisions", "dense_flops", "skipped_flops")}
    params = after["module_params"]
    skipped_params = sum(
        params[m] * (a - b)
        for m in after["skipped"]
        for a, b in zip(after["skipped"][m], before["skipped"][m], strict=True)
    )
    tokens = after["tokens"] - before["tokens"]
    all_params = tokens * sum(params[m] * len(after["skipped"][m]) for m in after["skipped"])
    return {
        "realised_sparsity": d["skipped_decisions"] / max(d["decisions"], 1),
        "realised_sparsity_params": skipped_params / max(all_params, 1),
        "ideal_speedup": d["dense_flops"] / max(d["dense_flops"] - d["skipped_flops"], 1.0),
        "threshold": after["threshold"],
        "dense_tokens": after.get("dense_tokens"),  # the server's dense window ([lo, hi] or None)
    }


def _median_row(rounds: list[dict]) -> dict:
    """One (variant, C): the median over rounds of every figure, and the rounds' tokens/s."""
    row = {k: v for k, v in rounds[0].items() if not isinstance(v, float)}
    for k, v in rounds[0].items():
        if isinstance(v, float):
            row[k] = statistics.median(r[k] for r in rounds)
    row.pop("round", None)
    row["rounds_output_tok_s"] = [r["output_tok_s"] for r in rounds]
    return row


def _serve_and_measure(variants, args, work: Path, life: int, runs: dict) -> None:
    """One life: every variant's server started afresh (all up at once), then ``--rounds`` rounds
    of every (C, variant), variants alternating in order; rows added to ``runs[(variant, C)]``."""
    from skipgpt.serving.vllm_llama import STATS_INTERVAL_S

    work.mkdir(parents=True, exist_ok=True)
    servers = {}
    with contextlib.ExitStack() as stack:
        for name, model, dense in variants:  # all up at once: rounds interleave the variants
            stats = None if dense else work / f"{name}.stats.json"
            servers[name] = (
                stack.enter_context(Server(model, dense, stats, work / f"{name}.log", args)),
                stats,
            )
            asyncio.run(_batch(servers[name][0].url, 2, 2, 8, args.request_timeout))  # warm-up
        for r in range(args.rounds):
            order = variants if (r + life) % 2 == 0 else variants[::-1]
            for c in args.concurrency:
                n = args.requests_c1 if c == 1 else args.requests
                for name, _, _ in order:
                    server, stats = servers[name]
                    before = _stats(server.url, stats, STATS_INTERVAL_S)
                    row = asyncio.run(_batch(server.url, n, c, args.max_tokens, args.request_timeout))
                    row.update(_window(before, _stats(server.url, stats, STATS_INTERVAL_S)))
                    row.update(variant=name, concurrency=c, round=r, life=life)
                    runs.setdefault((name, c), []).append(row)
                    print(json.dumps(row), flush=True)


def _add_life_ratios(rows: list[dict], runs: dict) -> None:
    """Each row's tokens/s against dense per server life (the median of the life's rounds over
    that of its dense server's): ``life_ratios`` and their median ``vs_dense``."""

    def per_life(name, c):
        lives: dict[int, list[float]] = {}
        for r in runs[(name, c)]:
            lives.setdefault(r.get("life", 0), []).append(r["output_tok_s"])
        return {life: statistics.median(v) for life, v in lives.items()}

    for row in rows:
        mine, dense = per_life(row["variant"], row["concurrency"]), per_life("dense", row["concurrency"])
        ratios = [mine[life] / dense[life] for life in sorted(mine) if life in dense]
        row["life_ratios"] = [round(x, 4) for x in ratios]
        row["vs_dense"] = statistics.median(ratios)


def _write_table(record: dict, path: Path) -> None:
    """The Markdown table of a run's record (``--out``'s JSON), with the command that made it."""
    rows = record["rows"]
    dense_tps = {r["concurrency"]: r["output_tok_s"] for r in rows if r["variant"] == "dense"}
    lines = [
        "| variant | θ | dense window | C | out tok/s | vs dense | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
        "| skipped (modules / params) | ideal |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        theta = f"{r['threshold']:.4g}" if "threshold" in r else "–"
        window = r.get("dense_tokens", "–")  # "–": dense, or a record from before the column
        window = (
            "none" if window is None else window if isinstance(window, str) else f"{window[0]}-{window[1]}"
        )
        sp = (
            f"{r['realised_sparsity']:.1%} / {r['realised_sparsity_params']:.1%}"
            if "realised_sparsity" in r
            else "0% / 0%"
        )
        ideal = f"{r['ideal_speedup']:.2f}x" if "ideal_speedup" in r else "1.00x"
        # over several server lives: the median of each life's ratio, the lives' range beside it
        lives = r.get("life_ratios") or []
        vs = r.get("vs_dense", r["output_tok_s"] / dense_tps[r["concurrency"]])
        vs = f"{vs:.2f}x" + (f" ({min(lives):.2f}-{max(lives):.2f})" if len(lives) > 1 else "")
        lines.append(
            f"| {r['variant']} | {theta} | {window} | {r['concurrency']} | {r['output_tok_s']:.1f} | "
            f"{vs} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {sp} | {ideal} |"
        )
    table = "\n".join(lines)
    print(table)
    from skipgpt.outputs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(
            f"Command: `{' '.join(record['argv'])}` ({record['machine']['cpus']} CPUs, client and servers on "
            f"the same machine; median of {record['settings']['rounds']} rounds, variants alternating"
            + (
                f", in each of {lives} server lives; vs dense: median of the lives' ratios (their range)"
                if (lives := record["settings"].get("server_lives", 1)) > 1
                else ""
            )
            + ")\n\n"
            + table
            + "\n"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="skipgpt folder (repeat); the first gives dense")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--requests-c1", type=int, default=8, help="requests at concurrency 1 (bounded time)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-gib", type=float, default=2)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every (variant, C) this many times, variants alternating in order between "
        "rounds with all servers up; the table gives the median of each figure (2 shared cores "
        "make one run noisy: +-15%% between runs)",
    )
    p.add_argument(
        "--server-lives",
        type=int,
        default=1,
        help="start every server afresh this many times and measure --rounds in each life; 'vs dense' "
        "is the median over lives of each life's ratio (cancels a server process's lasting bias)",
    )
    p.add_argument("--out", default="results/serve_load.json")
    p.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: write the table of --out's JSON (an earlier run)",
    )
    args = p.parse_args(argv)
    if args.render:
        out = Path(args.out)
        if not out.is_file():
            raise SystemExit(f"error: --render needs the JSON of an earlier run; {out} does not exist")
        _write_table(json.loads(out.read_text()), out.with_suffix(".md"))
        return 0
    if not args.model:
        p.error("--model is required (unless --render)")
    if args.rounds < 1 or args.server_lives < 1:
        p.error("--rounds and --server-lives must be >= 1")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a variant is named by its folder, a run's routers by the run (runs/demo/routers: demo)
    variants = [("dense", args.model[0], True)] + [
        (Path(m).name if Path(m).name != "routers" else Path(m).resolve().parent.name, m, False)
        for m in args.model
    ]
    work = Path(tempfile.mkdtemp(prefix="serve_load."))  # server logs and stats files
    print(f"server logs in {work}", flush=True)
    runs: dict[tuple[str, int], list[dict]] = {}
    for life in range(args.server_lives):
        _serve_and_measure(variants, args, work / f"life{life}", life, runs)
    rows = [_median_row(runs[(name, c)]) for name, _, _ in variants for c in args.concurrency]
    _add_life_ratios(rows, runs)
    record = {
        "argv": sys.argv,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": vars(args),
        "rows": rows,
        "rounds": [row for rs in runs.values() for row in rs],
    }
    from skipgpt.outputs import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    _write_table(record, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
