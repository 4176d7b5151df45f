"""Speed benchmark: dense vs masked (the paper code: compute all, gate) vs fast (really skips).

Scenarios (names are parsed, so other sizes work too):

* ``prefill_{B}x{T}``: one forward over B sequences of T tokens into a fresh ``DynamicCache``,
  logits of the last token only (what ``generate`` does); tokens/s = B·T / time.
* ``decode_b{B}`` (or ``decode_b{B}_ctx{C}``): after an untimed prefill of C context tokens,
  ``decode_steps`` forwards of one token per sequence against the cache (teacher-forced, so all
  three variants see the same tokens); tokens/s = B·steps / time. The cache is cropped back
  between repeats.

Each (scenario, variant) is warmed up, then timed ``repeats`` times, the variants interleaved
so that drift in machine load hits all three alike (prefill: run by run; decode: step by step),
each round in a rotated order; the median is reported. The routing is
either the model's trained routers (at ``threshold``) or forced random routing at a skip rate
(each (token, module) skips with that probability, the same decisions in every variant and
repeat; with ``router_overhead`` the routers are still run and their answer discarded, so the
time includes them). The ideal speedup is computed from the decisions actually taken (an
extra, untimed pass of the fast variant keeps them) with ``skipgpt.costs``.

The harness is public for the other timed jobs (``experiments.frontier``, ``benchmarks/``): ``token_pool``
(the input ids), ``new_cache``, ``Runner`` (one scenario of one variant), ``VariantRouting`` (the
routing context of each variant), ``rotated`` and ``decode_alternating`` (interleaved timing).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import model_cache_argument
from ..config import SkipGPTConfig
from ..costs import CostModel, ForwardRecord, routing_cost, routing_traffic
from ..data import wiki_text
from ..errors import SkipGPTError
from ..model import SkipGPTModel, get_skipgpt_model
from ..routing import RandomPolicy
from ..substitutes import substitute_ranks

__all__ = [
    "DEFAULT_SCENARIOS",
    "Scenario",
    "parse_scenario",
    "random_routing_override",
    "run_bench",
    "format_bench_table",
    "sweep_threshold",
    "format_sweep_table",
    "machine_string",
    "cpu_name",
    # the harness, for experiments.frontier and benchmarks/: inputs, caches, timed runners, routing
    "VARIANTS",
    "CACHES",
    "VariantRouting",
    "token_pool",
    "new_cache",
    "Runner",
    "rotated",
    "decode_alternating",
]

DEFAULT_SCENARIOS = ("prefill_1x1024", "prefill_4x512", "decode_b1", "decode_b8")
VARIANTS = ("dense", "masked", "fast")
SPARSITY_KEYS = ("module", "attn", "mlp", "params")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "prefill" | "decode"
    batch: int
    length: int  # prefill: tokens per sequence; decode: context before the timed steps
    steps: int = 0  # decode only

    @property
    def tokens_per_run(self) -> int:
        return self.batch * (self.length if self.kind == "prefill" else self.steps)


def parse_scenario(name: str, decode_context: int = 384, decode_steps: int = 64) -> Scenario:
    """``prefill_4x512`` / ``decode_b8`` / ``decode_b8_ctx256`` -> Scenario."""
    m = re.fullmatch(r"prefill_(\d+)x(\d+)", name)
    if m:
        b, t = int(m[1]), int(m[2])
        if b > 0 and t > 0:
            return Scenario(name, "prefill", b, t)
    m = re.fullmatch(r"decode_b(\d+)(?:_ctx(\d+))?", name)
    if m:
        b, c = int(m[1]), int(m[2]) if m[2] else decode_context
        if b > 0 and c > 0 and decode_steps > 0:
            return Scenario(name, "decode", b, c, decode_steps)
    raise SkipGPTError(
        f"unknown bench scenario {name!r}; accepted: prefill_BxT (e.g. prefill_4x512), decode_bB "
        f"(e.g. decode_b8) or decode_bB_ctxC; defaults: {','.join(DEFAULT_SCENARIOS)}"
    )


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_string() -> str:
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


# -- routing ---------------------------------------------------------------------------------------
def random_routing_override(model: SkipGPTModel, rate: float, seed: int = 0, router_overhead: bool = True):
    """A ``routing.RandomPolicy`` skipping each (token, module) with probability ``rate``.

    With ``router_overhead`` the layer's routers still run as inference runs them (fused when
    they share their input) and their decisions are discarded, so timings include what trained
    routers cost.
    """
    return RandomPolicy(rate, seed, router_overhead=router_overhead)


class VariantRouting:
    """The routing context of each variant (``dense``, ``masked``, ``fast``) of one model.

    ``random_rate`` None: the model's routers at ``threshold`` (None: the model's θ); else
    random routing at that skip rate (``seed``; ``router_overhead``: routers run, answer
    discarded), a fresh same-seed override for each run so every run takes the same decisions.
    """

    def __init__(self, model: SkipGPTModel, random_rate, threshold, seed, router_overhead):
        self.model, self.rate, self.seed, self.router_overhead = model, random_rate, seed, router_overhead
        self.threshold = model.state.threshold if threshold is None else float(threshold)

    def __call__(self, variant: str, keep_decisions: bool = False):
        """The routing context of one run of ``variant`` (a fresh random override)."""
        return self.reentrant(variant, keep_decisions)()

    def reentrant(self, variant: str, keep_decisions: bool = False):
        """A factory of routing contexts for ``variant`` that all share one random override, so a
        run entered step by step takes the same decisions as a run entered once."""
        if variant == "dense":
            return self.model.dense
        settings = {"execution": variant, "threshold": self.threshold, "keep_decisions": keep_decisions}
        if self.rate is not None:
            settings["policy"] = random_routing_override(
                self.model, self.rate, self.seed, router_overhead=self.router_overhead
            )
        return lambda: self.model.routing(**settings)

    def describe(self) -> str:
        if self.rate is not None:
            extra = ", routers run and ignored" if self.router_overhead else ", routers not run"
            return f"random routing at skip rate {self.rate:g} (seed {self.seed}{extra})"
        return f"trained routers, threshold {self.threshold:g}"


# -- inputs ----------------------------------------------------------------------------------------
def token_pool(tokenizer, n: int, vocab: int, seed: int, text: str | None) -> tuple[torch.Tensor, str]:
    """``(ids (n,), source)``: the tokenised ``text`` (default: Wikipedia text of the offline
    assets, ``data.wiki_text``), repeated if short, ids >= ``vocab`` dropped; without a tokenizer
    or text, random ids from ``seed``. ``source`` says which, for the report."""
    if tokenizer is not None:
        source = "given text" if text else "Wikipedia text (exllamav2 calibration data)"
        text = text or wiki_text()
        if text:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
            ids = ids[ids < vocab]
            if ids.numel() > 0:
                reps = -(-n // ids.numel())
                return ids.repeat(reps)[:n].clone(), source
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g), "random token ids"


# -- timing ----------------------------------------------------------------------------------------
# --cache name -> transformers class: DynamicCache grows by concatenation (copies each layer's
# K/V every step); StaticCache is preallocated and written in place
CACHES = {"dynamic": "DynamicCache", "static": "StaticCache"}


def new_cache(model, kind: str = "dynamic", max_len: int = 0):
    """A fresh HF cache of ``kind`` (a static one holds ``max_len`` tokens)."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def _croppable(cache) -> bool:
    layers = getattr(cache, "layers", [])
    return all(type(layer).__name__ == "DynamicLayer" for layer in layers)


class Runner:
    """Runs one scenario for one variant of ``model``; keeps a decode cache between repeats.

    ``ids`` (>= batch x (length [+ steps]) tokens) is cut into the prompt (B, T) and, for decode,
    the teacher-forced new tokens (B, steps). ``prepare()`` fills the decode cache (untimed),
    ``run()`` times one prefill or all decode steps, ``step(s)`` one decode step, ``finish()``
    crops the cache back; ``records(decisions)`` gives the ``ForwardRecord``s of the cost model.
    """

    def __init__(self, model, scenario: Scenario, ids: torch.Tensor, cache: str = "dynamic"):
        self.model, self.sc, self.cache_kind = model, scenario, cache
        b, L = scenario.batch, scenario.length
        if scenario.kind == "prefill":
            self.prompt, self.new = ids[: b * L].view(b, L), None
        else:
            need = L + scenario.steps
            self.prompt = ids[: b * need].view(b, need)[:, :L].contiguous()
            self.new = ids[: b * need].view(b, need)[:, L:].contiguous()
        self.cache = None
        self.cache_arg = model_cache_argument(model)

    def prepare(self) -> None:
        """Decode: (re)fill the cache with the context (untimed)."""
        if self.sc.kind == "decode" and self.cache is None:
            self.cache = new_cache(self.model, self.cache_kind, self.sc.length + self.sc.steps)
            self.model(
                input_ids=self.prompt, **{self.cache_arg: self.cache}, use_cache=True, logits_to_keep=1
            )

    def run(self) -> float:
        """Time one run: the prefill, or all decode steps."""
        if self.sc.kind == "prefill":
            cache = new_cache(self.model, self.cache_kind, self.sc.length)
            t0 = time.perf_counter()
            self.model(input_ids=self.prompt, **{self.cache_arg: cache}, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0
        dt = sum(self.step(s) for s in range(self.sc.steps))
        self.finish()
        return dt

    def step(self, s: int) -> float:
        """Time decode step ``s`` against the prepared cache."""
        t0 = time.perf_counter()
        self.model(input_ids=self.new[:, s : s + 1], **{self.cache_arg: self.cache}, use_cache=True)
        return time.perf_counter() - t0

    def finish(self) -> None:
        """After the decode steps: crop the cache back to the context (or drop a static one)."""
        if _croppable(self.cache):
            self.cache.crop(-self.sc.steps)
        else:
            self.cache = None

    def records(self, decisions: dict[tuple[int, str], list[torch.Tensor]]) -> list[ForwardRecord]:
        sc = self.sc
        if sc.kind == "prefill":
            forwards = [(sc.length, 0, sc.batch)]
        else:
            forwards = [(1, sc.length + s, sc.batch) for s in range(sc.steps)]
        out = []
        for i, (length, past, logits) in enumerate(forwards):
            execute = {k: v[i] for k, v in decisions.items() if i < len(v)}
            out.append(ForwardRecord(sc.batch, length, past=past, logits_tokens=logits, execute=execute))
        return out


def rotated(items, k: int) -> list:
    """``items`` rotated left by ``k`` (the order of the variants in round k)."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def decode_alternating(runners: dict, contexts: dict, steps: int) -> dict[str, float]:
    """One decode run per variant, the variants taking turns step by step: a change of machine
    speed during the run (other load, clocks) then hits every variant alike, not one of them.

    ``contexts[v]()`` enters variant v's routing; it is entered once per step (untimed) and
    keeps one decision stream across the steps. Returns each variant's total step time.
    """
    total = dict.fromkeys(runners, 0.0)
    for s in range(steps):
        for v in rotated(list(runners), s):  # no variant always steps first
            with contexts[v]():
                total[v] += runners[v].step(s)
    for runner in runners.values():
        runner.finish()
    return total


def _sparsity(stats: dict) -> dict[str, float]:
    return {k: round(float(stats[k]), 4) for k in SPARSITY_KEYS}


@torch.inference_mode()
def run_bench(
    model,
    tokenizer=None,
    *,
    scenarios=None,
    repeats: int = 5,
    warmup: int = 1,
    threshold: float | None = None,
    random_routing: float | None = None,
    seed: int = 0,
    decode_context: int = 384,
    decode_steps: int = 64,
    router_overhead: bool = True,
    cache: str = "dynamic",
    text: str | None = None,
    progress: bool = True,
    router_config: SkipGPTConfig | None = None,
) -> dict:
    """Tokens/s of dense, masked and fast execution per scenario, with the ideal speedup.

    ``model``: a ``SkipGPTModel`` (its routers decide, at ``threshold``) or a plain HF causal
    LM, which is then wrapped for the run (and unwrapped after) with ``router_config``'s routers
    (default ``SkipGPTConfig()``: the default router) and needs ``random_routing``.
    ``random_routing``: force each (token, module) to skip with this probability.
    Returns the ``bench`` JSON of DESIGN.md: ``scenarios``, ``sparsity``, ``cost_model``,
    ``machine``, ``settings``.
    """
    if cache not in CACHES:
        raise SkipGPTError(f"unknown cache {cache!r}; accepted: {list(CACHES)}")
    if repeats < 1 or warmup < 0:
        raise SkipGPTError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if random_routing is not None and not 0.0 <= float(random_routing) <= 1.0:
        raise SkipGPTError(f"random_routing must be a skip rate in [0, 1], got {random_routing!r}")
    names = list(scenarios) if scenarios else list(DEFAULT_SCENARIOS)
    parsed = [parse_scenario(n, decode_context, decode_steps) for n in names]

    wrapped = not isinstance(model, SkipGPTModel)
    if wrapped:
        if random_routing is None:
            raise SkipGPTError(
                "this model has no routers: pass random_routing (e.g. --random-routing 0.4) "
                "or a skipgpt output folder with trained routers"
            )
        model = get_skipgpt_model(model, router_config or SkipGPTConfig())
    was_training = model.training
    model.eval()
    routing = VariantRouting(model, random_routing, threshold, seed, router_overhead)
    cost = CostModel.from_config(
        model.config, router_hidden=_router_hidden(model), substitute_ranks=substitute_ranks(model)
    )
    vocab = model.config.get_text_config(decoder=True).vocab_size
    pool_size = max(s.batch * (s.length + s.steps) for s in parsed)
    ids, source = token_pool(tokenizer, pool_size, vocab, seed, text)
    ids = ids.to(next(model.parameters()).device)

    results = []
    stats_acc: dict[tuple[int, str], tuple[float, float]] = {}
    bar = tqdm(
        total=len(parsed) * (len(VARIANTS) * (warmup + repeats) + 1),
        desc="bench",
        disable=not progress,
        leave=False,
    )
    try:
        for sc in parsed:
            runners = {v: Runner(model, sc, ids, cache) for v in VARIANTS}
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(warmup + repeats):
                for v in VARIANTS:
                    with routing(v):  # the context prefill (decode), untimed
                        runners[v].prepare()
                if sc.kind == "decode":
                    gc.collect()
                    bar.set_postfix_str(f"{sc.name} (variants alternate every step)")
                    run_times = decode_alternating(
                        runners, {v: routing.reentrant(v) for v in VARIANTS}, sc.steps
                    )
                    bar.update(len(VARIANTS))
                else:
                    run_times = {}
                    for v in rotated(VARIANTS, r):  # no variant always runs first
                        bar.set_postfix_str(f"{sc.name} {v}")
                        gc.collect()
                        with routing(v):  # a fresh override: every run takes the same decisions
                            run_times[v] = runners[v].run()
                        bar.update()
                if r >= warmup:
                    for v in VARIANTS:
                        times[v].append(run_times[v])
            # the decisions actually taken (same routing as the timed fast runs), untimed
            rec = Runner(model, sc, ids, cache)
            with routing("fast"):
                rec.prepare()
            model.reset_stats()
            with routing("fast", keep_decisions=True):
                rec.run()
                stats = model.sparsity_stats()
                decisions = {k: list(v) for k, v in model.state.decisions.items()}
                for k in model.state.counted:
                    s0, c0 = stats_acc.get(k, (0.0, 0.0))
                    stats_acc[k] = (s0 + model.state.skipped[k], c0 + model.state.counted[k])
                model.reset_stats()
            bar.update()
            records = rec.records(decisions)
            ideal = routing_cost(cost, records, model.routing_settings.removed)
            med = {v: statistics.median(times[v]) for v in VARIANTS}
            tok = {v: sc.tokens_per_run / med[v] for v in VARIANTS}
            speedup = tok["fast"] / tok["dense"]
            row = {
                "name": sc.name,
                "kind": sc.kind,
                "batch": sc.batch,
                "tokens": sc.length if sc.kind == "prefill" else sc.steps,
                "context": sc.length if sc.kind == "decode" else 0,
                "dense_tok_s": round(tok["dense"], 2),
                "masked_tok_s": round(tok["masked"], 2),
                "fast_tok_s": round(tok["fast"], 2),
                "speedup": round(speedup, 4),
                "masked_speedup": round(tok["masked"] / tok["dense"], 4),
                "ideal_speedup": round(ideal["ideal_speedup"], 4),
                "efficiency": round(speedup / ideal["ideal_speedup"], 4),
                "sparsity": _sparsity(stats),
                "router_overhead_frac": round(ideal["router_flops"] / ideal["dense_flops"], 4),
                "times_s": {v: [round(t, 5) for t in times[v]] for v in VARIANTS},
            }
            if sc.kind == "decode":
                row["ideal_speedup_memory"] = round(routing_traffic(cost, records)["ideal_speedup"], 4)
            results.append(row)
    finally:
        bar.close()
        model.train(was_training)
        if wrapped:
            model.unwrap()

    return {
        "scenarios": results,
        "sparsity": _overall_sparsity(model, stats_acc),
        "cost_model": cost.describe(),
        "machine": machine_string(),
        "settings": {
            "routing": routing.describe(),
            "random_routing": random_routing,
            "threshold": routing.threshold,
            "repeats": repeats,
            "warmup": warmup,
            "statistic": "median",
            "decode_context": decode_context,
            "decode_steps": decode_steps,
            "decode_alternating": True,
            "cache": CACHES[cache],
            "input": source,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "seed": seed,
        },
    }


def _router_hidden(model: SkipGPTModel) -> int:
    router = next(iter(model.routed_layers[0].routers.values()))
    first = router.net[0]
    return 0 if len(router.net) == 1 else first.out_features


def _overall_sparsity(
    model: SkipGPTModel, acc: dict[tuple[int, str], tuple[float, float]]
) -> dict[str, float]:
    """module / attn / mlp / params sparsity over every recorded decision of the benchmark."""

    def mean(keys):
        num = sum(acc[k][0] for k in keys if k in acc)
        den = sum(acc[k][1] for k in keys if k in acc)
        return num / den if den else 0.0

    weights = {k: float(v) for k, v in model.branch_params.items()}
    rate = {k: s / c for k, (s, c) in acc.items() if c}
    return {
        "module": round(mean(list(acc)), 4),
        "attn": round(mean([k for k in acc if k[1] == "attn"]), 4),
        "mlp": round(mean([k for k in acc if k[1] == "mlp"]), 4),
        "params": round(sum(w * rate.get(k, 0.0) for k, w in weights.items()) / sum(weights.values()), 4),
    }


# -- reporting -------------------------------------------------------------------------------------
def format_bench_table(result: dict) -> str:
    """Markdown table of a ``run_bench`` result, with the routing, machine and cost model."""
    lines = [
        "| scenario | dense tok/s | masked tok/s | fast tok/s | masked/dense | speedup (fast/dense) "
        "| ideal | efficiency | skipped (module) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["scenarios"]:
        ideal, efficiency = f"{s['ideal_speedup']:.2f}x", f"{s['efficiency']:.2f}"
        if "ideal_speedup_memory" in s:
            ideal += f" (bw {s['ideal_speedup_memory']:.2f}x)"
            efficiency += f" (bw {s['speedup'] / s['ideal_speedup_memory']:.2f})"
        lines.append(
            f"| {s['name']} | {s['dense_tok_s']:.1f} | {s['masked_tok_s']:.1f} | {s['fast_tok_s']:.1f} "
            f"| {s['masked_speedup']:.2f}x | {s['speedup']:.2f}x | {ideal} | {efficiency} "
            f"| {s['sparsity']['module']:.1%} |"
        )
    sp = result["sparsity"]
    st = result.get("settings", {})
    contexts = sorted({s["context"] for s in result["scenarios"] if s["kind"] == "decode"})
    decode = (
        f"decode: {st.get('decode_steps', '?')} steps after {'/'.join(map(str, contexts))} context tokens "
        f"({st.get('cache', 'DynamicCache')}){', variants alternating step by step' if st.get('decode_alternating') else ''}; "
        if contexts
        else ""
    )
    lines += [
        "",
        f"Routing: {st.get('routing', '?')}; realised sparsity module {sp['module']:.1%}, attn {sp['attn']:.1%}, "
        f"mlp {sp['mlp']:.1%}, params {sp['params']:.1%}. Median of {st.get('repeats', '?')} runs after "
        f"{st.get('warmup', '?')} warm-up; {decode}input: {st.get('input', '?')}.",
        f"Machine: {result['machine']}.",
        f"Cost model: {result['cost_model']} efficiency = speedup / ideal. "
        "'bw' = bandwidth bound of a decode step (a module's weights are read if any sequence executes it; "
        "efficiency (bw) = speedup / that bound).",
    ]
    return "\n".join(lines)


def sweep_threshold(
    model: SkipGPTModel,
    tokenizer=None,
    *,
    thresholds=(0.3, 0.4, 0.5, 0.6, 0.7),
    ppl_fn=None,
    scenarios=("prefill_1x1024",),
    repeats: int = 3,
    progress: bool = True,
    **bench_kwargs,
) -> list[dict]:
    """The compute dial: for each θ, sparsity, perplexity (``ppl_fn(model) -> float`` or a
    dict with ``ppl``, run under that θ with fast execution) and measured/ideal speedup."""
    if not isinstance(model, SkipGPTModel):
        raise SkipGPTError("sweep_threshold needs a model with trained routers (a skipgpt output folder)")
    rows = []
    for theta in tqdm(list(thresholds), desc="threshold sweep", disable=not progress):
        row: dict = {"threshold": float(theta)}
        if ppl_fn is not None:
            with torch.no_grad(), model.routing(threshold=float(theta), execution="fast"):
                ppl = ppl_fn(model)
            row["ppl"] = float(ppl["ppl"] if isinstance(ppl, dict) else ppl)
        res = run_bench(
            model,
            tokenizer,
            scenarios=list(scenarios),
            repeats=repeats,
            threshold=float(theta),
            progress=False,
            **bench_kwargs,
        )
        row["sparsity"] = res["sparsity"]
        row["scenarios"] = {
            s["name"]: {k: s[k] for k in ("speedup", "ideal_speedup", "efficiency")} for s in res["scenarios"]
        }
        rows.append(row)
    return rows


def format_sweep_table(rows: list[dict]) -> str:
    names = list(rows[0]["scenarios"]) if rows else []
    head = (
        "| θ | skipped (module) | skipped (params) | PPL | "
        + " | ".join(f"{n} speedup (ideal)" for n in names)
        + " |"
    )
    lines = [head, "|" + "---:|" * (4 + len(names))]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        cells = " | ".join(
            f"{r['scenarios'][n]['speedup']:.2f}x ({r['scenarios'][n]['ideal_speedup']:.2f}x)" for n in names
        )
        lines.append(
            f"| {r['threshold']:.2f} | {r['sparsity']['module']:.1%} | {r['sparsity']['params']:.1%} | {ppl} | {cells} |"
        )
    return "\n".join(lines)
