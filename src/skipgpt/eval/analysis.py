"""Where a routed model skips: per-layer rates, rates along the sequence, a token-level view.

``trace_routing`` runs a routed model over token windows with ``keep_decisions`` on and keeps
every (layer, module) execute decision; the functions below turn a ``RoutingTrace`` into
numbers (``layer_skip_rates``, ``position_execution``), matplotlib figures (Agg backend, PNG)
and an HTML token view; ``analyze_routing`` writes them all with a markdown report.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import MODULES
from ..errors import SkipGPTError
from ..model import SkipGPTModel

__all__ = [
    "RoutingTrace",
    "trace_routing",
    "layer_skip_rates",
    "position_execution",
    "plot_layer_rates",
    "plot_layer_heatmap",
    "plot_position",
    "plot_token_view",
    "token_view_html",
    "analyze_routing",
    "REPORT_NAME",
    "check_analysis_dir",
]

REPORT_NAME = "report.md"
MODULE_LABEL = {"attn": "attention", "mlp": "MLP"}
COLOR = {"attn": "#1f77b4", "mlp": "#ff7f0e"}


@dataclass
class RoutingTrace:
    """Execute decisions of one run: ``execute[module]`` is a bool array (L, N, T) (True = ran)
    over L layers, N windows of T tokens; a module that is not routed always runs."""

    execute: dict[str, np.ndarray]
    token_ids: np.ndarray  # (N, T)

    @property
    def num_layers(self) -> int:
        return next(iter(self.execute.values())).shape[0]


@torch.no_grad()
def trace_routing(
    model: SkipGPTModel, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> RoutingTrace:
    """Run ``model`` on ``blocks`` (N, T) and keep every execute decision (routing as set now:
    threshold, override, ...). Windows are whole token blocks, so there is no padding."""
    if not isinstance(model, SkipGPTModel):
        raise SkipGPTError("routing analysis needs a routed model (a skipgpt output folder)")
    if not model.state.enabled:
        raise SkipGPTError("routing is switched off (dense); nothing to analyse")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model.reset_stats()
    try:
        with model.routing(keep_decisions=True):
            for i in tqdm(
                range(0, blocks.shape[0], batch_size), desc="routing", disable=not progress, leave=False
            ):
                model(input_ids=blocks[i : i + batch_size].to(device), use_cache=False)
            decisions = {k: torch.cat(v, dim=0) for k, v in model.state.decisions.items()}
    finally:
        model.train(was_training)
        model.state.decisions.clear()
    n, t = blocks.shape
    layers = model.state.num_layers
    execute = {}
    for m in MODULES:
        rows = [decisions.get((i, m), torch.ones(n, t, dtype=torch.bool)) for i in range(layers)]
        execute[m] = torch.stack(rows).numpy()
    return RoutingTrace(execute=execute, token_ids=blocks.cpu().numpy())


def layer_skip_rates(trace: RoutingTrace) -> dict[str, np.ndarray]:
    """module -> (L,) fraction of tokens that skipped it at each layer."""
    return {m: 1.0 - e.mean(axis=(1, 2)) for m, e in trace.execute.items()}


def position_execution(trace: RoutingTrace) -> dict[str, np.ndarray]:
    """module -> (T,) execution rate at each token position, over layers and windows."""
    return {m: e.mean(axis=(0, 1)) for m, e in trace.execute.items()}


# -- figures ------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path | None):
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
        _pyplot().close(fig)
    return fig


def plot_layer_rates(rates: dict[str, np.ndarray], path: str | Path | None = None):
    """Grouped bars: skip rate of attention and MLP at each layer. Returns the figure."""
    plt = _pyplot()
    layers = len(next(iter(rates.values())))
    x = np.arange(layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * layers + 2), 3.6))
    width = 0.4
    for j, (m, r) in enumerate(rates.items()):
        ax.bar(
            x + (j - 0.5) * width, r, width, label=f"{MODULE_LABEL[m]} (mean {r.mean():.2f})", color=COLOR[m]
        )
    ax.set_xticks(x, [str(i) for i in x], fontsize=8)
    ax.set_xlim(-0.6, layers - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("skip rate (fraction of tokens)")
    ax.set_title("Per-layer skip rate: attention vs MLP")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_layer_heatmap(rates: dict[str, np.ndarray], path: str | Path | None = None):
    """A (module x layer) heatmap of skip rates, each cell labelled. Returns the figure."""
    plt = _pyplot()
    grid = np.stack(list(rates.values()))
    layers = grid.shape[1]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * layers + 2), 2.4))
    im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_yticks(range(len(rates)), [MODULE_LABEL[m] for m in rates])
    ax.set_xticks(range(layers), [str(i) for i in range(layers)], fontsize=8)
    ax.set_xlabel("layer")
    for (r, c), v in np.ndenumerate(grid):  # dark text on the bright end of viridis
        ax.text(
            c, r, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="black" if v > 0.6 else "white"
        )
    fig.colorbar(im, ax=ax, label="skip rate", fraction=0.03, pad=0.01)
    ax.set_title("Skip rate per layer and module")
    return _save(fig, path)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return y
    kernel = np.ones(window) / window
    padded = np.pad(y, (window // 2, window - 1 - window // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def plot_position(curves: dict[str, np.ndarray], path: str | Path | None = None):
    """Execution rate against token position (raw, faint; smoothed, bold). Returns the figure."""
    plt = _pyplot()
    length = len(next(iter(curves.values())))
    window = max(1, length // 32)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    pos = np.arange(length)
    for m, y in curves.items():
        ax.plot(pos, y, color=COLOR[m], alpha=0.25, linewidth=0.8)
        label = MODULE_LABEL[m] + (f" ({window}-token moving mean)" if window > 1 else "")
        ax.plot(pos, _smooth(y, window), color=COLOR[m], linewidth=2.0, label=label)
    ax.set_xlim(0, max(length - 1, 1))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("token position in the window")
    ax.set_ylabel("execution rate (over layers, windows)")
    ax.set_title("Execution rate along the sequence")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _token_labels(tokenizer, ids) -> list[str]:
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)]) if tokenizer is not None else str(int(i))
        text = text.replace("\n", "⏎").replace("\t", "⇥")
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)  # no font has them
        out.append(text.strip() or ("␣" * len(text) if text else "∅"))  # rotated labels hide spaces
    return out


def plot_token_view(tokens: list[str], execute: dict[str, np.ndarray], path: str | Path | None = None):
    """Which modules each token ran: ``execute[module]`` (L, T) bool; one panel per module,
    layers down, tokens across (dark = executed, light = skipped). Returns the figure."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    layers, length = next(iter(execute.values())).shape
    fig, axes = plt.subplots(
        len(execute),
        1,
        figsize=(max(6.0, 0.24 * length + 1.5), 0.16 * layers * len(execute) + 2.2),
        sharex=True,
    )
    axes = np.atleast_1d(axes)
    for ax, (m, e) in zip(axes, execute.items(), strict=True):
        cmap = ListedColormap(["#f2f2f2", COLOR[m]])
        ax.imshow(e.astype(float), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_ylabel(f"{MODULE_LABEL[m]}\nlayer", fontsize=8)
        step = max(1, math.ceil(layers / 8))
        ax.set_yticks(range(0, layers, step))
        ax.set_xticks(np.arange(-0.5, length, 1), minor=True)  # thin white lines between cells
        ax.set_yticks(np.arange(-0.5, layers, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
        ax.set_title(
            f"{MODULE_LABEL[m]}: coloured = executed, grey = skipped ({1 - e.mean():.0%} skipped)", fontsize=9
        )
    axes[-1].set_xticks(range(length), tokens, rotation=90, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def token_view_html(tokens: list[str], execute: dict[str, np.ndarray]) -> str:
    """A standalone HTML page: the text with each token shaded by how many modules it skipped
    (hover for the layers), and a layer x token grid per module."""
    layers, length = next(iter(execute.values())).shape
    total = layers * len(execute)
    spans = []
    for t, tok in enumerate(tokens):
        skipped = {m: [i for i in range(layers) if not e[i, t]] for m, e in execute.items()}
        frac = sum(len(v) for v in skipped.values()) / total
        tip = "; ".join(f"{MODULE_LABEL[m]} skipped at layers {v or 'none'}" for m, v in skipped.items())
        spans.append(
            f'<span class="tok" style="background: rgba(214,39,40,{frac:.2f})" title="{html.escape(tip)}">'
            f"{html.escape(tok)}</span>"
        )
    grids = []
    for m, e in execute.items():
        head = "".join(f'<th class="t">{html.escape(tok)}</th>' for tok in tokens)
        rows = "".join(
            f"<tr><th>{i}</th>"
            + "".join(f'<td class="{"x" if e[i, t] else "s"}"></td>' for t in range(length))
            + "</tr>"
            for i in range(layers)
        )
        grids.append(
            f"<h3>{MODULE_LABEL[m]} (rows: layers; filled = executed)</h3><table><tr><th></th>{head}</tr>{rows}</table>"
        )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>skipgpt token view</title><style>
body {{ font-family: sans-serif; margin: 1.5em; }} .tok {{ white-space: pre; border-radius: 3px; padding: 0 1px; }}
p.text {{ line-height: 1.9; font-size: 15px; }} table {{ border-collapse: collapse; font-size: 10px; }}
td {{ width: 12px; height: 10px; border: 1px solid #fff; }} td.x {{ background: #444; }} td.s {{ background: #eee; }}
th.t {{ writing-mode: vertical-rl; font-weight: normal; white-space: pre; }}
</style></head><body>
<h2>Which modules each token skipped</h2>
<p>Red shading = fraction of the {total} routed (layer, module) decisions the token skipped; hover a token
for its layers.</p><p class="text">{"".join(spans)}</p>
{"".join(grids)}
</body></html>
"""


# -- the whole analysis -------------------------------------------------------------------------
def check_analysis_dir(path: Path) -> Path:
    """Refuse a file, or a non-empty folder that is not an earlier analysis (no report.md)."""
    if path.exists():
        if not path.is_dir():
            raise SkipGPTError(f"output {path} is a file; give a new folder or an earlier analysis folder")
        if any(path.iterdir()) and not (path / REPORT_NAME).exists():
            raise SkipGPTError(
                f"output folder {path} exists and is not an analysis folder (no {REPORT_NAME}); give a new folder"
            )
    return path


def _trend(curve: np.ndarray) -> tuple[float, float]:
    """Execution rate over the first and the last quarter of the positions."""
    q = max(1, len(curve) // 4)
    return float(curve[:q].mean()), float(curve[-q:].mean())


def _report(summary: dict[str, Any]) -> str:
    from .tables import markdown_table

    s = summary["sparsity"]
    rates = summary["layer_skip_rates"]
    rows = [{"layer": i, **{m: rates[m][i] for m in rates}} for i in range(len(rates["attn"]))]
    layer_table = markdown_table(rows, [("layer", "layer"), *[(f"{MODULE_LABEL[m]} skip", m) for m in rates]])
    trend = summary["position_trend"]
    trend_lines = "\n".join(
        f"- {MODULE_LABEL[m]}: executes {a:.1%} of the time in the first quarter of the window, "
        f"{b:.1%} in the last quarter ({'rises' if b > a + 0.005 else 'falls' if b < a - 0.005 else 'flat'})."
        for m, (a, b) in trend.items()
    )
    return f"""# Routing analysis

Model `{summary["model"]}` on `{summary["dataset"]}`: {summary["windows"]} windows of {summary["seq_len"]} tokens
(threshold {summary["threshold"]}{", " + summary["routing"] if summary.get("routing") else ""}).

| sparsity | module | attention | MLP | parameters |
|---|---|---|---|---|
| skipped | {s["module"]:.3f} | {s["attn"]:.3f} | {s["mlp"]:.3f} | {s["params"]:.3f} |

*module* = skipped (token, module) decisions / all routed decisions; *parameters* = per token, parameters
of the skipped modules / attention+MLP parameters of the decoder layers.

## Per layer

![per-layer skip rate](layer_skip_rates.png)

![skip-rate heatmap](layer_skip_heatmap.png)

{layer_table}

## Along the sequence

![execution rate vs position](position_execution.png)

{trend_lines}

(The paper saw attention execution rise and MLP execution fall along the sequence.)

## One text, token by token

![token view](token_view.png)

Interactive version: [token_view.html](token_view.html) (hover a token for the layers it skipped).
"""


def analyze_routing(
    model: SkipGPTModel,
    tokenizer,
    blocks: torch.Tensor,
    out_dir: str | Path,
    sample_ids: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trace ``blocks`` (N, T) and a sample text (``sample_ids`` (S,), default the first 48
    tokens of the first window), write the PNGs, ``token_view.html``, ``summary.json`` and
    ``report.md`` into ``out_dir`` (all or nothing), and return the summary."""
    from ..outputs import staged_dir

    out_dir = check_analysis_dir(Path(out_dir))
    if blocks.dim() != 2 or blocks.numel() == 0:
        raise SkipGPTError(f"blocks must be a non-empty (N, T) token tensor, got shape {tuple(blocks.shape)}")
    trace = trace_routing(model, blocks, batch_size=batch_size, progress=progress)
    stats = model.sparsity_stats()
    sample_ids = blocks[0, :48] if sample_ids is None else sample_ids.reshape(-1)
    sample = trace_routing(model, sample_ids[None], progress=False)
    tokens = _token_labels(tokenizer, sample_ids.tolist())
    sample_exec = {m: e[:, 0, :] for m, e in sample.execute.items()}

    rates = layer_skip_rates(trace)
    curves = position_execution(trace)
    summary = {
        **(meta or {}),
        "windows": int(blocks.shape[0]),
        "seq_len": int(blocks.shape[1]),
        "threshold": model.state.threshold,
        "sparsity": {k: stats[k] for k in ("module", "attn", "mlp", "params")},
        "layer_skip_rates": {m: [float(v) for v in r] for m, r in rates.items()},
        "position_trend": {m: _trend(c) for m, c in curves.items()},
        "sample_tokens": tokens,
    }
    summary.setdefault("model", "?")
    summary.setdefault("dataset", "?")
    import json

    with staged_dir(out_dir) as stage:
        plot_layer_rates(rates, stage / "layer_skip_rates.png")
        plot_layer_heatmap(rates, stage / "layer_skip_heatmap.png")
        plot_position(curves, stage / "position_execution.png")
        plot_token_view(tokens, sample_exec, stage / "token_view.png")
        (stage / "token_view.html").write_text(token_view_html(tokens, sample_exec))
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (stage / REPORT_NAME).write_text(_report(summary))
    return summary
