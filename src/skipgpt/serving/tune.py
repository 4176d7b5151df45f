"""Where routing pays in vLLM, per forward size: measure it and choose the dense window.

On a CPU a decode step costs mostly the reading of the weights, so whether skipping pays depends on
how many tokens a forward holds, on θ (how many of them skip) and on the machine. ``measure`` times
it: for each size N, an in-process vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) generates
``steps`` greedy tokens for N prompts, ``rounds`` times, while the model alternates forward by
forward between its routed layers (every forward routed) and vLLM's dense ones
(``ServeRoutingState.ab_seconds``): both see the same batch, the same context lengths and the same
load of the machine. Over the decode forwards of exactly N tokens, the ratio is the median of dense /
routed seconds of neighbouring forwards (above 1: routing pays).

``choose_window`` turns the ratios into the dense window: the smallest range [lo, hi] holding every
measured size where routing loses (ratio < 1). A size between measured ones takes the verdict of the
nearest measured size (a tie: dense); sizes beyond the largest measured one are routed (prefill
chunks, where gathering the executing rows pays); None when routing pays at every measured size.
``skipgpt serve-tune`` adds the window and its measurement to the prepared folder's config.json
(``skipgpt.tuned_windows``: one record per θ, a new one replacing that of the same θ); the served
model uses the record of the θ it serves (``tuned_window_for``, ``vllm_llama._dense_tokens``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from ..errors import SkipGPTError

__all__ = [
    "DENSE_TOKENS",
    "DEFAULT_SIZES",
    "PROMPTS",
    "checked_window",
    "choose_window",
    "served_window",
    "measure",
    "tuned_record",
    "tuned_window_for",
    "write_tuned_window",
]

# Forwards of this many tokens (lo, hi inclusive) run the dense layers (every token executes every
# module) unless ``serve-tune`` measured a window for the served θ: decode steps of 2-16 sequences
# on a CPU, where a GEMM's cost is mostly reading the weights (an MLP: 95 us for 1 row, 173 us for
# 8), so a skipping token saves little while the routers, substitutes and masks cost the same per
# layer. ``--dense-tokens none`` (hf override ``skipgpt_dense_tokens: null``) routes every forward.
DENSE_TOKENS = (2, 16)
DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# decode batches are built from these, cycled (routing decisions depend on the text)
PROMPTS = (
    "The history of the printing press begins",
    "def merge_sorted(a, b):\n    ",
    "In the winter of 1812, the army",
    "Photosynthesis converts light energy into",
    "The best way to learn a new language is",
    "Once upon a time, in a small village by the sea, there lived",
    "The stock market fell sharply today after",
    "To bake bread at home, you need",
)


def choose_window(ratios: dict[int, float]) -> tuple[int, int] | None:
    """{forward size: dense / routed seconds} -> the dense window [lo, hi], or None (see the module
    docstring for the rule)."""
    sizes = sorted(ratios)
    losing = [n for n in sizes if ratios[n] < 1.0]
    if not losing:
        return None
    first, last = losing[0], losing[-1]
    below = [n for n in sizes if n < first]  # routing pays at all of these
    above = [n for n in sizes if n > last]
    lo = math.ceil((below[-1] + first) / 2) if below else 1  # a tie goes to dense
    hi = (last + above[0]) // 2 if above else last
    return (lo, hi)


def measure(
    llm, sizes=DEFAULT_SIZES, steps: int = 24, rounds: int = 3, progress: bool = True
) -> dict[int, dict]:
    """Time routed against dense decode forwards of each size in ``llm`` (an in-process
    ``vllm.LLM`` of a routed folder); returns {size: {dense_ms, routed_ms, ratio, forwards}}: each
    variant's median seconds over its forwards of exactly that many tokens, the median ratio of
    neighbouring (dense, routed) forwards, and how many such pairs there were."""
    from tqdm.auto import tqdm
    from vllm import SamplingParams

    def ab(on: bool) -> None:
        def apply(model):
            state = model.skipgpt_state
            state.ab_seconds, state._ab_routed_next = ({} if on else None), True

        llm.apply_model(apply)

    sampling = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    results = {}
    for n in tqdm(sizes, desc="serve-tune", unit="size", disable=not progress):
        batch = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        try:
            ab(True)
            llm.generate(batch, sampling, use_tqdm=False)  # warm-up: both variants at this size
            ab(True)
            for _ in range(rounds):
                llm.generate(batch, sampling, use_tqdm=False)
            seconds = llm.apply_model(lambda model: model.skipgpt_state.ab_seconds)[0]
        finally:
            ab(False)
        dense, routed = seconds.get((False, n), []), seconds.get((True, n), [])
        if not dense or not routed:
            raise SkipGPTError(
                f"no decode forward of {n} tokens was timed (the engine scheduled the {n} sequences "
                "in other batches: is --max-num-seqs below it?)"
            )
        # the i-th dense and routed forwards of a size ran next to each other: the median of their
        # ratios cancels what slows both (other tenants of the machine) better than a ratio of medians
        pairs = list(zip(dense, routed, strict=False))
        results[n] = {
            "dense_ms": 1e3 * statistics.median(dense),
            "routed_ms": 1e3 * statistics.median(routed),
            "ratio": statistics.median(d / r for d, r in pairs),
            "forwards": len(pairs),
        }
    return results


def tuned_record(threshold: float, results: dict[int, dict], settings: dict[str, Any]) -> dict[str, Any]:
    """What ``write_tuned_window`` stores: θ, the window, the measurement and where it was made."""
    window = choose_window({n: r["ratio"] for n, r in results.items()})
    return {
        "threshold": threshold,
        "dense_tokens": list(window) if window else None,
        "sizes": {str(n): {k: round(v, 4) for k, v in r.items()} for n, r in sorted(results.items())},
        "settings": settings,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def tuned_window_for(entry: dict[str, Any], threshold: float) -> dict[str, Any] | None:
    """The record ``serve-tune`` wrote for ``threshold`` into a prepared folder's ``skipgpt`` entry, or None."""
    for record in entry.get("tuned_windows") or []:
        if record.get("threshold") == threshold:
            return record
    return None


def checked_window(value: Any, name: str) -> tuple[int, int] | None:
    """A dense window as configured (``[lo, hi]`` or null) -> ``(lo, hi)`` or None; anything else
    is refused in one line naming where it came from."""
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 1 <= value[0] <= value[1]
    ):
        raise SkipGPTError(f"{name} must be null or [lo, hi] with 1 <= lo <= hi, got {value!r}")
    return (value[0], value[1])


def served_window(entry: dict[str, Any] | None, threshold: float) -> tuple[int, int] | None:
    """The dense window a model served at ``threshold`` uses without an override: the one
    ``serve-tune`` measured for that θ (the prepared folder's ``skipgpt`` entry), else ``DENSE_TOKENS``."""
    tuned = tuned_window_for(entry, threshold) if entry else None
    if tuned is None:
        return DENSE_TOKENS
    return checked_window(tuned.get("dense_tokens"), "skipgpt.tuned_windows[].dense_tokens")


def write_tuned_window(folder: str | Path, record: dict[str, Any]) -> None:
    """Add ``record`` to ``skipgpt.tuned_windows`` of the prepared ``folder``'s config.json,
    replacing the record of the same θ (atomically)."""
    from ..outputs import atomic_path

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    entry = config.get("skipgpt")
    if not isinstance(entry, dict):
        raise SkipGPTError(f"{path} has no skipgpt entry: not a prepared vLLM folder")
    others = [r for r in entry.get("tuned_windows") or [] if r.get("threshold") != record["threshold"]]
    entry["tuned_windows"] = sorted([*others, record], key=lambda r: r["threshold"])
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
