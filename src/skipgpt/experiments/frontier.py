"""Quality against *measured* speed: dense, SkipGPT, ShortGPT and LLM-Drop on one frontier.

A *point* is one model setting: the dense model; a set of trained routers at one threshold θ
(SkipGPT, the compute dial); the base model with its k lowest-Block-Influence layers removed
(ShortGPT, k = 1..N); with its lowest-scored attention/MLP modules dropped to the parameter
share of k layers (LLM-Drop, the matching budgets); or with its lowest-scored MLPs replaced by
closed-form low-rank substitutes to the same shares, net of the substitutes (the static
substitute baseline, ``baselines.substitute``). The static methods run as they would be
deployed: no router is evaluated (``routing.StaticPolicy``). Each point gets:

* ``sparsity``: realised module and parameter sparsity (measured on the PPL windows for routed
  models, pooled over the evaluation sets; the removal's share for ShortGPT);
* ``ppl``: perplexity per evaluation set, on the same windows for every point;
* ``speedup``: tokens/s of the point over tokens/s of the dense model, per scenario
  (``prefill_1x1024``, ``decode_b1``, ``decode_b8``, as ``eval.speed`` parses them), the two
  timed alternately in the same run (prefill: run by run in a rotated order; decode: step by
  step), ``repeats`` runs after ``warmup``, read by their median (as ``skipgpt bench``) or, on a
  shared machine whose other jobs slow single runs down, their minimum (``statistic``); every
  timing is kept in ``times_s``, and the speedups are re-read from them when a run resumes;
* ``ideal``: the FLOP speedup of the work the point skips (``skipgpt.costs``): the routing it
  actually took (an extra, untimed pass) for SkipGPT and the static substitutes, less what
  the substitutes cost (``CostModel.for_model``); for the removals their removal, where a
  removed attention also saves its K/V projections.

A *line* is one method's curve (one per router set for SkipGPT). ``summary`` reads each line at
1.15×, 1.25× and 1.4× measured speedup (``ppl_at``): on the line's *monotone envelope* (its
points that no other point of the line beats in both speed and PPL), log PPL interpolated
linearly in speedup between the two envelope points around the target; a target below the
envelope's slowest point gets that point's PPL (it is reached at no cost), one above its fastest
point is *not reached* (None). The dense point belongs to no line.

``run_frontier`` builds and measures the points one by one and keeps every finished point in
``OUT/frontier.progress.json`` (written atomically), so an interrupted run resumes where it
stopped; the progress file is tied to the settings it was made with.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..baselines.llm_drop import build_llm_drop, module_importance
from ..baselines.scores import select_by_budget, unit_params
from ..baselines.shortgpt import block_influence, remove_layers
from ..baselines.substitute import select_replaced_mlps, substitute_config, substitute_params
from ..config import MODULES
from ..costs import CostModel, ForwardRecord, routing_cost
from ..errors import SkipGPTError
from ..eval.perplexity import DENSE_SPARSITY, evaluate_perplexity
from ..eval.speed import Runner, Scenario, decode_alternating, parse_scenario, rotated, token_pool
from ..model import SkipGPTModel, get_skipgpt_model
from ..outputs import atomic_path, write_json_atomic
from ..routing import StaticPolicy
from ..substitutes import fit_substitutes

__all__ = [
    "SCENARIOS",
    "TARGETS",
    "METHODS",
    "PROGRESS_NAME",
    "INTERPOLATION",
    "RouterLine",
    "default_max_layers",
    "spread_order",
    "time_against_dense",
    "STATISTICS",
    "read_times",
    "measure_speed",
    "static_ideal",
    "evaluate_quality",
    "envelope",
    "ppl_at",
    "summarize",
    "format_frontier_markdown",
    "plot_frontier",
    "frontier_settings",
    "load_progress",
    "run_frontier",
]

SCENARIOS = ("prefill_1x1024", "decode_b1", "decode_b8")
TARGETS = (1.15, 1.25, 1.4)
METHODS = ("dense", "skipgpt", "shortgpt", "llm-drop", "substitute")
BASELINES = ("shortgpt", "llm-drop", "substitute")  # the lines a frontier may draw beside SkipGPT
PROGRESS_NAME = "frontier.progress.json"
INTERPOLATION = (
    "monotone envelope of each line (points no other point of the line beats in both measured speedup "
    "and PPL), log PPL interpolated linearly in speedup between its two points around the target; "
    "below the envelope's slowest point, that point's PPL; above its fastest, not reached"
)
LINE_LABELS = {
    "skipgpt": "SkipGPT-RT",
    "shortgpt": "ShortGPT",
    "llm-drop": "LLM-Drop",
    "substitute": "static substitute",
}


def default_max_layers(num_layers: int, share: float = 0.4) -> int:
    """ShortGPT's default N: the layer count nearest ``share`` of the parameters (at least 1,
    at most all but one layer)."""
    return min(max(1, round(share * num_layers)), max(1, num_layers - 1))


def spread_order(n: int) -> list[int]:
    """0..n-1 ordered so that every prefix spreads over the range: the last, then the midpoints
    of the gaps left, breadth first (n=8: 7, 3, 1, 5, 0, 2, 4, 6)."""
    from collections import deque

    order, gaps = ([n - 1], deque([(-1, n - 1)])) if n else ([], deque())
    while gaps:
        lo, hi = gaps.popleft()
        if hi - lo > 1:
            mid = (lo + hi) // 2
            order.append(mid)
            gaps.extend([(lo, mid), (mid, hi)])
    return order


# -- speed ------------------------------------------------------------------------------------------
def time_against_dense(
    dense_runner: Runner,
    point_runner: Runner,
    scenario: Scenario,
    routing: Callable[[], contextlib.AbstractContextManager] | None = None,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds per run of the dense model and of one point, timed alternately in one run.

    ``dense_runner``/``point_runner``: ``eval.speed`` runners of ``scenario`` over the same
    token ids; ``routing()`` enters the point's routing (None: nothing to enter). Prefill runs
    alternate run by run (each round in a rotated order), decode runs step by step. Returns
    ``{"dense": [repeats], "point": [repeats]}`` (warm-up runs dropped).
    """
    runners = {"dense": dense_runner, "point": point_runner}
    contexts = {"dense": contextlib.nullcontext, "point": routing or contextlib.nullcontext}
    times: dict[str, list[float]] = {v: [] for v in runners}
    for r in range(warmup + repeats):
        for v, runner in runners.items():
            with contexts[v]():  # the decode context, untimed (kept between runs)
                runner.prepare()
        if scenario.kind == "decode":
            gc.collect()
            run = decode_alternating(runners, contexts, scenario.steps)
        else:
            run = {}
            for v in rotated(list(runners), r):  # neither always runs first
                gc.collect()
                with contexts[v]():
                    run[v] = runners[v].run()
        if r >= warmup:
            for v in runners:
                times[v].append(run[v])
    return times


STATISTICS = {"median": statistics.median, "min": min}


def read_times(
    times: dict[str, list[float]], scenario: Scenario, statistic: str = "median"
) -> tuple[dict, float]:
    """``{"dense": [s], "point": [s]}`` run times -> (tokens/s of each, speedup of the point), each
    run set read by ``statistic`` ('median' or 'min')."""
    if statistic not in STATISTICS:
        raise SkipGPTError(f"unknown statistic {statistic!r}; accepted: {', '.join(STATISTICS)}")
    t = {v: STATISTICS[statistic](ts) for v, ts in times.items()}
    return {v: round(scenario.tokens_per_run / x, 3) for v, x in t.items()}, round(t["dense"] / t["point"], 4)


def static_ideal(cost: CostModel, records: Sequence[ForwardRecord], removed) -> float:
    """FLOP speedup of statically removing the (layer, module) pairs ``removed`` from forwards
    shaped as ``records`` (their own routing ignored). A removed attention saves its K/V
    projections too (a routed token still writes K/V)."""
    removed = {(int(i), str(m)) for i, m in removed}
    forwards = [
        ForwardRecord(
            f.batch,
            f.length,
            past=f.past,
            logits_tokens=f.logits_tokens,
            execute={k: torch.zeros(f.batch, f.length, dtype=torch.bool) for k in removed},
        )
        for f in records
    ]
    return routing_cost(cost, forwards, removed)["ideal_speedup"]


@torch.inference_mode()
def measure_speed(
    dense,
    model,
    scenarios: Sequence[Scenario],
    ids: torch.Tensor,
    cost: CostModel,
    *,
    routing: Callable[[], contextlib.AbstractContextManager] | None = None,
    removed=None,
    repeats: int = 3,
    warmup: int = 1,
    dense_runners: dict[str, Runner] | None = None,
    statistic: str = "median",
) -> dict:
    """Measured and ideal speedup of ``model`` against ``dense`` per scenario.

    ids: (n,) token pool (``eval.speed``'s). ``routing``: the point's routing context factory.
    ``statistic``: how the runs are read, 'median' or 'min'. ``removed``: the (layer, module)
    pairs the point removes statically (ShortGPT: both modules of a removed layer; LLM-Drop),
    whose ideal is ``static_ideal``; None for a routed model, whose ideal comes from the
    decisions of one more, untimed run of each scenario. ``dense_runners``
    (scenario name -> runner) keeps the dense model's decode contexts between points.
    Returns ``{"speedup", "ideal", "tok_s", "times_s"}``, each keyed by scenario name.
    """
    dense_runners = {} if dense_runners is None else dense_runners
    enter = routing or contextlib.nullcontext
    out: dict[str, dict] = {"speedup": {}, "ideal": {}, "tok_s": {}, "times_s": {}}
    for sc in scenarios:
        if sc.name not in dense_runners:
            dense_runners[sc.name] = Runner(dense, sc, ids)
        runner = Runner(model, sc, ids)
        times = time_against_dense(dense_runners[sc.name], runner, sc, enter, repeats, warmup)
        out["times_s"][sc.name] = {v: [round(t, 6) for t in ts] for v, ts in times.items()}
        out["tok_s"][sc.name], out["speedup"][sc.name] = read_times(times, sc, statistic)
        if removed is not None:
            ideal = static_ideal(cost, runner.records({}), removed)
        elif isinstance(model, SkipGPTModel):
            model_cost = CostModel.for_model(model)  # its substitutes' work is not saved
            model.reset_stats()
            with enter():
                runner.prepare()
            with enter(), model.routing(keep_decisions=True):
                runner.run()
                decisions = {k: list(v) for k, v in model.state.decisions.items()}
            model.reset_stats()
            removed_for_good = model.routing_settings.removed
            ideal = routing_cost(model_cost, runner.records(decisions), removed_for_good)["ideal_speedup"]
        else:
            ideal = 1.0
        out["ideal"][sc.name] = round(ideal, 4)
        runner.cache = None
    return out


# -- quality ----------------------------------------------------------------------------------------
def evaluate_quality(
    model, evals: dict[str, torch.Tensor], routing=None, batch_size: int = 2, desc: str = "", progress=True
) -> tuple[dict[str, float], dict[str, float]]:
    """PPL per evaluation set (name -> (N, T) windows) under ``routing()``, and the sparsity the
    model realised, pooled over all sets (token-weighted; zeros for a plain model)."""
    ppl, pooled, tokens = {}, dict.fromkeys(DENSE_SPARSITY, 0.0), 0
    for name, blocks in evals.items():
        with (routing or contextlib.nullcontext)():
            r = evaluate_perplexity(
                model, blocks, batch_size=batch_size, progress=progress, desc=f"{desc} {name}"
            )
        ppl[name] = round(r["ppl"], 4)
        for k in pooled:
            pooled[k] += float(r["sparsity"][k]) * r["tokens"]
        tokens += r["tokens"]
    return ppl, {k: round(v / max(tokens, 1), 4) for k, v in pooled.items()}


# -- the summary ------------------------------------------------------------------------------------
def envelope(curve: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(speedup, ppl) points -> the monotone envelope, ascending in both: the points that no other
    point beats in both speedup (>=) and PPL (<). Non-finite values are left out."""
    pts = [(float(s), float(p)) for s, p in curve if math.isfinite(s) and math.isfinite(p) and p > 0]
    env, best = [], math.inf
    for s, p in sorted(pts, key=lambda x: (-x[0], x[1])):
        if p < best:
            env.append((s, p))
            best = p
    return env[::-1]


def ppl_at(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """PPL of a line at ``target`` measured speedup (``INTERPOLATION``), None if not reached."""
    env = envelope(curve)
    if not env or env[-1][0] < target:
        return None
    i = next(j for j, (s, _) in enumerate(env) if s >= target)
    if i == 0:
        return env[0][1]
    (s0, p0), (s1, p1) = env[i - 1], env[i]
    w = (target - s0) / (s1 - s0)
    return math.exp(math.log(p0) + w * (math.log(p1) - math.log(p0)))


def _lines(points: Sequence[dict]) -> dict[str, list[dict]]:
    lines: dict[str, list[dict]] = {}
    for p in points:
        if p["method"] != "dense":
            lines.setdefault(p["line"], []).append(p)
    return lines


def summarize(
    points: Sequence[dict], scenarios: Sequence[str], dataset: str, targets: Sequence[float] = TARGETS
) -> dict[str, dict[str, dict[str, float | None]]]:
    """{line: {scenario: {"1.15": PPL on ``dataset`` or None, ...}}} (``ppl_at``)."""
    out = {}
    for line, pts in _lines(points).items():
        out[line] = {}
        for sc in scenarios:
            curve = [(p["speedup"][sc], p["ppl"][dataset]) for p in pts if sc in p.get("speedup", {})]
            out[line][sc] = {
                f"{t:g}": (None if (v := ppl_at(curve, t)) is None else round(v, 4)) for t in targets
            }
    return out


# -- rendering --------------------------------------------------------------------------------------
def _x(v) -> str:
    return f"{v:.2f}x" if isinstance(v, int | float) else ""


def format_frontier_markdown(result: dict) -> str:
    """Markdown: the settings, the summary (PPL at the target speedups) and every point."""
    from ..eval.tables import markdown_table

    s = result["settings"]
    scenarios, datasets = s["scenarios"], s["eval_datasets"]
    dataset = s["summary_dataset"]
    line_names = result.get("lines", {})
    targets = [f"{t:g}" for t in s["targets"]]
    # every evaluation set read at the targets, the summarised one first
    by_set = {d: summarize(result["points"], scenarios, d, s["targets"]) for d in datasets}
    by_set[dataset] = result["summary"]
    order = [dataset] + [d for d in datasets if d != dataset]
    rows = []
    for line in result["summary"]:
        for sc in scenarios:
            row = {"line": line_names.get(line, line), "scenario": sc}
            for d in order:
                for t, v in by_set[d].get(line, {}).get(sc, {}).items():
                    row[f"{d}@{t}"] = "not reached" if v is None else v
            rows.append(row)
    summary = markdown_table(
        rows,
        [("method", "line"), ("scenario", "scenario")]
        + [(f"{d} PPL at {t}x", f"{d}@{t}") for d in order for t in targets],
    )
    cols = [
        ("point", "label"),
        ("module sp.", lambda r: r["sparsity"]["module"]),
        ("param sp.", lambda r: r["sparsity"]["params"]),
    ]
    cols += [(f"{d} PPL", lambda r, d=d: r["ppl"][d]) for d in datasets]
    cols += [
        (f"{sc} speedup (ideal)", lambda r, sc=sc: f"{_x(r['speedup'].get(sc))} ({_x(r['ideal'].get(sc))})")
        for sc in scenarios
    ]
    g = {
        k: s.get(k, "?")
        for k in ("model", "calib_blocks", "seq_len", "dataset", "max_windows", "eval_seq_len")
    }
    train = s.get("training")
    if train:
        routers = (
            f"routers trained here ({train['max_steps']} steps × {train['batch_size']}×{g['seq_len']} tokens of "
            f"`{g['dataset']}`, target {train['target_sparsity']} of the parameters)"
        )
    else:
        routers = "routers from " + ", ".join(f"`{r}`" for r in s.get("routers", []))
        if any("@" in r for r in s.get("routers", [])):
            routers += "; `DIR@θs`: that set at its own θ values"
    skip_lines = ", ".join(line_names[k] for k in line_names if k.startswith("skipgpt"))
    substitutes = ""
    # runs made before the static policy timed LLM-Drop through constant routers
    no_router = " The static methods run no router (`routing.StaticPolicy`)." if "baselines" in s else ""
    if "substitute" in s.get("baselines", []):
        rank = next((p["rank"] for p in result["points"] if p["method"] == "substitute"), "hidden/16")
        substitutes = (
            f"; the static substitute baseline at the same shares, net of its substitutes (the lowest-scored "
            f"MLPs replaced by rank-{rank} least-squares fits on the same text)"
        )
    head = (
        f"Model `{g['model']}`. Points: dense; {skip_lines} ({routers}) at θ = "
        f"{', '.join(f'{t:g}' for t in s['thetas'])}; ShortGPT with 1..{s['max_layers']} layers removed "
        f"(Block Influence on {g['calib_blocks']}×{g['seq_len']} tokens of `{g['dataset']}`); LLM-Drop at the "
        f"same parameter shares (module scores on the same text){substitutes}.{no_router} Sparsity: SkipGPT as realised on the PPL windows (pooled), the static methods "
        f"their choice (param sp.: gross; a substitute's parameters are netted in `params_net`). PPL: the first "
        f"{g['max_windows']} windows of "
        f"{g['eval_seq_len']} tokens of each set, the same for every point. Speedup: tokens/s against the "
        f"dense model timed alternately in the same run (prefill run by run, decode step by step), "
        f"{s.get('statistic', 'median')} of {s['repeats']} runs after {s['warmup']} warm-up; decode: {s['decode_steps']} steps after "
        f"{s['decode_context']} context tokens (DynamicCache); ideal: FLOP speedup of the work skipped "
        f"(`skipgpt.costs`). {result['machine']}."
    )
    dense_ppl = result["points"][0]["ppl"] if result["points"] else {}
    dense_text = ", ".join(f"{d} {dense_ppl.get(d, '?')}" for d in order)
    summ = (
        f"PPL at a measured speedup: {INTERPOLATION}. The dense model ({dense_text}) is the 1.00x point "
        "of every scenario."
    )
    parts = [head, summary, summ, markdown_table(result["points"], cols)]
    if not result.get("complete", True):
        missing = [k for k in result.get("planned", []) if k not in {p["key"] for p in result["points"]}]
        parts.insert(0, (
            f"**Partial run: {len(result['points'])} of {len(result['points']) + len(missing)} points measured** "
            f"(missing: {', '.join(missing)}); a line's 'not reached' may only mean its points are not measured "
            "yet. The same command resumes the run."
        ))  # fmt: skip
    return "\n\n".join(parts)


def plot_frontier(result: dict, path: str | Path) -> Path:
    """PNG: one panel per scenario, PPL (log, ``summary_dataset``) against measured speedup, one
    line per method (points in build order: θ or removed layers ascending), dense as a star."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    s = result["settings"]
    scenarios, dataset = s["scenarios"], s["summary_dataset"]
    names = result.get("lines", {})
    lines = _lines(result["points"])
    legend_beside = len(lines) > 6  # beside the panels, not over the last one's points
    width = 5.2 * len(scenarios) + (3.4 if legend_beside else 0.0)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(width, 4.4), squeeze=False)
    dense = next((p for p in result["points"] if p["method"] == "dense"), None)
    markers = {"skipgpt": "o", "shortgpt": "s", "llm-drop": "^", "substitute": "D"}
    # more lines than the default cycle's 10 colours: tab20, so that no two lines share one
    palette = plt.get_cmap("tab20").colors if len(lines) > 10 else None
    for ax, sc in zip(axes[0], scenarios, strict=True):
        for i, (line, pts) in enumerate(lines.items()):
            pts = [p for p in pts if sc in p["speedup"]]
            if pts:
                ax.plot(
                    [p["speedup"][sc] for p in pts],
                    [p["ppl"][dataset] for p in pts],
                    marker=markers.get(pts[0]["method"], "o"),
                    ms=4,
                    label=names.get(line, line),
                    **({"color": palette[i % len(palette)]} if palette else {}),
                )
        if dense is not None:
            ax.plot([1.0], [dense["ppl"][dataset]], "k*", ms=11, label="dense")
        for t in s["targets"]:
            ax.axvline(t, color="0.8", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(sc)
        ax.set_xlabel("measured speedup against dense (x)")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].set_ylabel(f"{dataset} PPL (log)")
    if legend_beside:
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{s['model']}: quality against measured speed")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# -- building and measuring every point --------------------------------------------------------------
@dataclass
class RouterLine:
    """One set of trained routers: its line key (``skipgpt`` or ``skipgpt:<name>``), display
    label, and a loader giving the routed model over a copy of the base (called only when one of
    its points is still missing); ``thetas``: its own θ values (None: the settings' ``thetas``)."""

    key: str
    label: str
    load: Callable[[], SkipGPTModel]
    info: dict = field(default_factory=dict)
    thetas: Sequence[float] | None = None


@dataclass
class _Plan:
    key: str
    method: str
    line: str | None
    label: str
    build: Callable[[], tuple]  # -> (model, routing factory, removed pairs, static sparsity, record)


def frontier_settings(
    *,
    thetas: Sequence[float],
    max_layers: int,
    eval_datasets: Sequence[str],
    scenarios: Sequence[str] = SCENARIOS,
    repeats: int = 3,
    warmup: int = 1,
    decode_steps: int = 32,
    decode_context: int = 384,
    eval_batch_size: int = 2,
    baselines: Sequence[str] = BASELINES,
    substitute_rank: int | None = None,
    **extra,
) -> dict:
    """The settings a frontier is made with (JSON-able; they tie the progress file), checked.

    ``baselines``: which of ``BASELINES`` get a line; ``substitute_rank``: the static
    substitutes' rank (None: hidden // 16). ``extra``: what else the caller wants recorded
    (model, calibration text, windows, ...)."""
    thetas = [float(t) for t in thetas]
    if not thetas or any(not 0.0 <= t <= 1.0 for t in thetas):
        raise SkipGPTError(f"thetas must be a non-empty list of values in [0, 1], got {thetas}")
    if repeats < 1 or warmup < 0 or max_layers < 1:
        raise SkipGPTError(
            f"repeats >= 1, warmup >= 0 and max layers >= 1 needed, got {repeats}, {warmup}, {max_layers}"
        )
    if not eval_datasets:
        raise SkipGPTError("no evaluation sets given; e.g. wiki-heldout,ptb")
    for sc in scenarios:
        parse_scenario(sc, decode_context, decode_steps)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise SkipGPTError(f"unknown baseline {unknown[0]!r}; accepted: {', '.join(BASELINES)}")
    if substitute_rank is not None and substitute_rank < 1:
        raise SkipGPTError(f"substitute rank must be >= 1 (or None: hidden // 16), got {substitute_rank}")
    return dict(extra) | {
        "baselines": [b for b in BASELINES if b in baselines],
        "substitute_rank": substitute_rank,
        "scenarios": list(scenarios),
        "thetas": thetas,
        "max_layers": int(max_layers),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "decode_steps": int(decode_steps),
        "decode_context": int(decode_context),
        "eval_batch_size": int(eval_batch_size),
        "eval_datasets": list(eval_datasets),
        "summary_dataset": eval_datasets[0],
        "targets": list(TARGETS),
        "interpolation": INTERPOLATION,
    }


_EXTENSIBLE = ("routers", "thetas")  # settings a rerun may add to (points of the old values stay valid)


def _only_adds(old: dict, new: dict) -> bool:
    """Whether ``new`` settings are ``old`` ones with router sets or θ values added (none dropped)."""
    rest = lambda s: {k: v for k, v in s.items() if k not in _EXTENSIBLE}  # noqa: E731
    grown = [set(old.get(k) or []) <= set(new.get(k) or []) for k in _EXTENSIBLE]
    return rest(old) == rest(new) and all(grown) and old != new


def load_progress(out: str | Path, settings: dict, overwrite: bool = False) -> dict:
    """The progress record of ``out`` (``{"settings", "points": {key: point}}``): the one on disk
    when it was made with ``settings``, a fresh one when there is none or ``overwrite``. Settings
    that only add router sets or θ values extend the record (its finished points are kept and
    the new points are measured, each against dense timed beside it as always); a file made with
    other settings is refused, naming the settings that differ."""
    import json

    path = Path(out) / PROGRESS_NAME
    if path.exists() and not overwrite:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SkipGPTError(f"{path} is unreadable ({e}); pass --overwrite to start again") from None
        old = record.get("settings") or {}
        if _only_adds(old, settings):  # more router sets or θs, all else equal: the finished points stay
            record["settings"] = settings
        if record.get("settings") != settings:
            differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise SkipGPTError(
                f"{path} was made with other settings (differ: {', '.join(differ)}); give a new --output or "
                "pass --overwrite"
            )
        return record
    return {"settings": settings, "points": {}}


def run_frontier(
    base,
    tokenizer,
    *,
    out: str | Path,
    routers: Sequence[RouterLine],
    calib: torch.Tensor,
    evals: dict[str, torch.Tensor],
    settings: dict,
    base_spec: str | None = None,
    machine: str = "",
    overwrite: bool = False,
    statistic: str = "median",
    progress: bool = True,
) -> dict:
    """Build, evaluate and time every point; write ``frontier.{json,md,png}`` into ``out``.

    ``base``: the plain HF model (dense reference, never modified); ``calib``: (N, T) scoring
    text of ShortGPT and LLM-Drop; ``evals``: name -> (N, T) PPL windows, named as
    ``settings["eval_datasets"]`` (``frontier_settings``: θs, N, scenarios, repeats, ...). A rerun
    with the same settings re-uses the finished points of ``OUT/frontier.progress.json``; other
    settings are refused unless ``overwrite``. ``statistic`` ('median' or 'min') reads the timed
    runs; it is not a setting of the progress (the runs are kept, so a rerun may read them either
    way). Returns the result (``points``, ``summary``,
    ``lines``, ``machine``, ``settings``, ``complete``).
    """
    out = Path(out)
    base.eval()
    n = len(unit_params(base, "layers")[0])
    max_layers, thetas, scenarios = settings["max_layers"], settings["thetas"], settings["scenarios"]
    if not 1 <= max_layers < n:
        raise SkipGPTError(f"max layers {max_layers} must be in 1..{n - 1} (the model has {n} layers)")
    if list(evals) != settings["eval_datasets"]:
        raise SkipGPTError(
            f"evaluation sets {list(evals)} differ from the settings' {settings['eval_datasets']}"
        )
    parsed = [parse_scenario(sc, settings["decode_context"], settings["decode_steps"]) for sc in scenarios]
    repeats, warmup, eval_batch_size = settings["repeats"], settings["warmup"], settings["eval_batch_size"]
    if statistic not in STATISTICS:
        raise SkipGPTError(f"unknown statistic {statistic!r}; accepted: {', '.join(STATISTICS)}")
    record = load_progress(out, settings, overwrite)
    done: dict = record["points"]

    scores: dict[str, object] = {}

    def bi():
        if "bi" not in scores:
            scores["bi"] = block_influence(base, calib, progress=progress)
        return scores["bi"]

    def module_scores():
        if "modules" not in scores:
            scores["modules"] = module_importance(base, calib, progress=progress)
        return scores["modules"]

    layer_params, total = unit_params(base, "layers")
    module_params, _ = unit_params(base, MODULES)

    def shortgpt(k: int):
        removed, share = select_by_budget(dict(enumerate(bi())), layer_params, k / n, total, unit="layer")
        model = remove_layers(copy.deepcopy(base), removed).eval()
        pairs = [(i, m) for i in removed for m in MODULES]
        sp = {"module": len(removed) / n, "attn": len(removed) / n, "mlp": len(removed) / n, "params": share}
        return model, None, pairs, sp, {"removed_layers": sorted(int(i) for i in removed)}

    def llm_drop(k: int):
        target = sum(sorted(layer_params.values())[:k]) / total  # the share of k layers
        sc = module_scores()
        removed, share = select_by_budget(
            {u: sc[u] for u in module_params}, module_params, target, total, unit="module"
        )
        model = build_llm_drop(copy.deepcopy(base), removed, base_spec=base_spec, target=target).eval()

        def routing():  # the kept modules run, as in the pruned model: no constant router evaluated
            return model.routing(policy=StaticPolicy(), execution="fast")

        return (
            model,
            routing,
            removed,
            static_sparsity(removed, share),
            {"removed_modules": [[int(i), m] for i, m in removed]},
        )

    def static_sparsity(pairs, share: float) -> dict[str, float]:
        """The sparsity of skipping ``pairs`` for every token (a static policy records no
        decision for the modules that run)."""
        count = {m: sum(1 for _, mm in pairs if mm == m) for m in MODULES}
        return {"module": len(pairs) / (2 * n), "params": share} | {m: count[m] / n for m in MODULES}

    loaded: dict[str, SkipGPTModel] = {}
    config = substitute_config(settings.get("substitute_rank"))
    hidden = base.config.get_text_config(decoder=True).hidden_size  # multimodal: the LM's
    rank = config.rank_for(hidden)
    sub_params = substitute_params(hidden, rank)

    def substituted() -> SkipGPTModel:
        """A copy of the base with a closed-form substitute fitted for every MLP (each fit reads
        the dense model only, so one fit serves every point; a point picks which ones run)."""
        if "substitute" not in loaded:
            model = get_skipgpt_model(copy.deepcopy(base), config, base_spec=base_spec)
            fit_substitutes(model, calib, pairs=[(i, "mlp") for i in range(n)])
            loaded["substitute"] = model.eval()
        return loaded["substitute"]

    def static_substitute(k: int):
        target = sum(sorted(layer_params.values())[:k]) / total  # the share of k layers
        chosen, share = select_replaced_mlps(module_params, module_scores(), target, sub_params)
        model, policy = substituted(), StaticPolicy(chosen)

        def routing():
            return model.routing(policy=policy, execution="fast")

        gross = sum(module_params[u] for u in chosen) / total
        sp = static_sparsity(chosen, gross) | {"params_net": share}
        return model, routing, None, sp, {"replaced_mlps": sorted(i for i, _ in chosen), "rank": rank}

    def skipgpt(line: RouterLine, theta: float):
        if line.key not in loaded:
            loaded[line.key] = line.load().eval()
        model = loaded[line.key]

        def routing():
            return model.routing(threshold=theta, execution="fast")

        return model, routing, None, None, {"threshold": theta} | line.info

    per_line: list[list[_Plan]] = []
    for line in routers:
        per_line.append(
            [
                _Plan(
                    f"{line.key}@{t:g}",
                    "skipgpt",
                    line.key,
                    f"θ={t:g}",
                    lambda line=line, t=t: skipgpt(line, float(t)),
                )
                for t in sorted(thetas if line.thetas is None else line.thetas)
            ]
        )
    static = {
        "shortgpt": (shortgpt, lambda k: f"-{k} layer{'s' * (k > 1)}"),
        "llm-drop": (llm_drop, lambda k: f"share of {k} layer{'s' * (k > 1)}"),
        "substitute": (static_substitute, lambda k: f"rank {rank}, share of {k} layer{'s' * (k > 1)}"),
    }
    for method in settings.get("baselines", BASELINES):
        build, label = static[method]
        per_line.append(
            [
                _Plan(f"{method}@{k}", method, method, label(k), lambda k=k, build=build: build(k))
                for k in range(1, max_layers + 1)
            ]
        )
    dense_plan = _Plan("dense", "dense", None, "dense", lambda: (base, None, [], dict(DENSE_SPARSITY), {}))
    plans = [dense_plan] + [p for line in per_line for p in line]  # the order of the tables
    # the order of the run: the lines take turns, each from its fastest setting and then halving
    # the gaps (spread_order), so that a partial run already has every line over its whole range
    spread = [[line[i] for i in spread_order(len(line))] for line in per_line]
    run_order = [dense_plan] + [
        line[j] for j in range(max(map(len, spread), default=0)) for line in spread if j < len(line)
    ]
    names = {r.key: r.label for r in routers} | {k: v for k, v in LINE_LABELS.items() if k != "skipgpt"}

    cost = CostModel.from_config(base.config)
    pool = max(s.batch * (s.length + s.steps) for s in parsed)
    ids, source = token_pool(tokenizer, pool, cost.vocab, 0, None)
    ids = ids.to(next(base.parameters()).device)
    dense_runners: dict[str, Runner] = {}
    extra = {"timing_input": source}

    by_name = {sc.name: sc for sc in parsed}

    def reread(point: dict) -> dict:
        """The point with its speedups read from its times by this run's statistic."""
        if "times_s" not in point:
            return point
        point = copy.deepcopy(point)
        for name, times in point["times_s"].items():
            point["tok_s"][name], point["speedup"][name] = read_times(times, by_name[name], statistic)
        return point

    def result() -> dict:
        points = [reread(done[p.key]) for p in plans if p.key in done]
        return {
            "points": points,
            "summary": summarize(points, list(scenarios), settings["summary_dataset"]),
            "lines": names,
            "machine": machine,
            "settings": settings | extra | {"statistic": statistic},
            "complete": all(p.key in done for p in plans),
            "planned": [p.key for p in plans],
        }

    def write(final: bool = False) -> None:
        res = result()
        write_json_atomic(out / PROGRESS_NAME, record)
        write_json_atomic(out / "frontier.json", res)
        with atomic_path(out / "frontier.md") as tmp:
            tmp.write_text(format_frontier_markdown(res) + "\n")
        if final:
            plot_frontier(res, out / "frontier.png")

    out.mkdir(parents=True, exist_ok=True)
    todo = [p for p in run_order if p.key not in done]
    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), desc="frontier", disable=not progress)
    try:
        for plan in todo:
            bar.set_postfix_str(f"{plan.method} {plan.label}")
            model, routing, removed, static_sp, info = plan.build()
            ppl, measured = evaluate_quality(
                model, evals, routing, eval_batch_size, desc=f"{plan.method} {plan.label}", progress=progress
            )
            sparsity = static_sp or measured
            point = {
                "method": plan.method,
                "line": plan.line,
                "label": plan.label if plan.line is None else f"{names[plan.line]} {plan.label}",
                "key": plan.key,
                "sparsity": {k: round(float(v), 4) for k, v in sparsity.items()},
                "ppl": ppl,
            } | info
            if plan.method == "dense":  # the reference itself: 1 by definition, not timed
                point |= {"speedup": dict.fromkeys(scenarios, 1.0), "ideal": dict.fromkeys(scenarios, 1.0)}
            else:
                point |= measure_speed(
                    base,
                    model,
                    parsed,
                    ids,
                    cost,
                    routing=routing,
                    removed=removed,
                    repeats=repeats,
                    warmup=warmup,
                    dense_runners=dense_runners,
                    statistic=statistic,
                )
            done[plan.key] = point
            if plan.method != "skipgpt" and model is not base:
                del model
            gc.collect()
            write()
            bar.update()
    finally:
        bar.close()
    loaded.clear()
    write(final=True)
    return result()
