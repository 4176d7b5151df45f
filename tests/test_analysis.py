"""Routing analysis: the numbers and the pictures follow from a known, forced routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_ids, routed, tiny

from skipgpt.cli import main
from skipgpt.errors import SkipGPTError
from skipgpt.eval.analysis import (
    analyze_routing,
    layer_skip_rates,
    plot_layer_heatmap,
    plot_layer_rates,
    plot_position,
    position_execution,
    token_view_html,
    trace_routing,
)

T = 32


def forced(layer: int, module: str, h: torch.Tensor) -> torch.Tensor:
    """Layer 1's attention always skips; every MLP skips the second half of the window."""
    b, t = h.shape[:2]
    if module == "attn":
        return torch.full((b, t), layer != 1)
    return (torch.arange(t) < T // 2).expand(b, t)


@pytest.fixture(scope="module")
def traced():
    model, tok = routed("llama")
    blocks = random_ids(3, T, model.config.vocab_size)
    with model.routing(override=forced):
        trace = trace_routing(model, blocks, batch_size=2, progress=False)
    return model, tok, blocks, trace


def test_rates_follow_the_forced_routing(traced):
    model, _, _, trace = traced
    layers = model.state.num_layers
    rates = layer_skip_rates(trace)
    assert rates["attn"].tolist() == [1.0 if i == 1 else 0.0 for i in range(layers)]
    assert rates["mlp"].tolist() == [0.5] * layers
    curves = position_execution(trace)
    assert curves["mlp"].tolist() == [1.0] * (T // 2) + [0.0] * (T // 2)
    assert np.allclose(curves["attn"], (layers - 1) / layers)


def test_figures_draw_those_numbers(traced):
    _, _, _, trace = traced
    rates = layer_skip_rates(trace)
    fig = plot_layer_rates(rates)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [*rates["attn"].tolist(), *rates["mlp"].tolist()] and heights[1] == 1.0
    grid = plot_layer_heatmap(rates).axes[0].images[0].get_array()
    assert np.array_equal(np.asarray(grid), np.stack([rates["attn"], rates["mlp"]]))
    lines = plot_position(position_execution(trace)).axes[0].lines
    raw_mlp = next(line for line in lines if line.get_alpha() and line.get_color() == "#ff7f0e")
    assert list(raw_mlp.get_ydata()[:2]) == [1.0, 1.0] and raw_mlp.get_ydata()[-1] == 0.0


def test_token_view_html_marks_skips():
    execute = {
        "attn": np.array([[True, False], [True, True]]),
        "mlp": np.array([[True, True], [False, True]]),
    }
    page = token_view_html(["a", "<b>"], execute)
    assert "&lt;b&gt;" in page and "<b>" not in page  # token text is escaped
    assert "attention skipped at layers [0]; MLP skipped at layers none" in page  # token "<b>"
    assert "attention skipped at layers none; MLP skipped at layers [1]" in page  # token "a"


def test_analyze_writes_pngs_html_and_report(traced, tmp_path):
    model, tok, blocks, _ = traced
    out = tmp_path / "analysis"
    with model.routing(override=forced):
        summary = analyze_routing(
            model, tok, blocks, out, progress=False, meta={"model": "m", "dataset": "d"}
        )
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "layer_skip_heatmap.png",
        "layer_skip_rates.png",
        "position_execution.png",
        "token_view.png",
    ]
    import matplotlib.image

    for name in pngs:
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a real, non-blank picture
    assert summary["layer_skip_rates"]["attn"][1] == 1.0
    assert summary["position_trend"]["mlp"] == (1.0, 0.0)
    report = (out / "report.md").read_text()
    assert "![per-layer skip rate](layer_skip_rates.png)" in report and "| 1 | 1.000 | 0.500 |" in report
    assert "MLP: executes 100.0%" in report and "(falls)" in report
    assert json.loads((out / "summary.json").read_text())["sparsity"] == summary["sparsity"]
    # rerun into the same analysis folder: allowed; a foreign non-empty folder: refused, untouched
    with model.routing(override=forced):
        analyze_routing(model, tok, blocks, out, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(SkipGPTError, match="not an analysis folder"):
        analyze_routing(model, tok, blocks, foreign, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]


def test_dense_model_is_refused():
    model, _ = tiny("llama")
    with pytest.raises(SkipGPTError, match="routed model"):
        trace_routing(model, random_ids(1, 8, 100))


def test_cli_analyze(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "an"
    args = ["analyze", "--model", "random:llama", "--dataset", str(text), "--out", str(out)]
    assert main(args) == 2 and "dense model" in capsys.readouterr().err and not out.exists()
    more = [
        "--seq-len",
        "64",
        "--max-windows",
        "3",
        "--random-routing",
        "0.4",
        "--text",
        "hello there",
        "--json",
    ]
    assert main([*args, *more]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 3 and 0.2 < result["sparsity"]["module"] < 0.6
    assert (out / "report.md").exists() and (out / "token_view.png").stat().st_size > 0
    page = (out / "token_view.html").read_text()
    assert page.count('class="tok"') == len("hello there")  # byte tokenizer: one token per character
