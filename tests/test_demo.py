"""`skipgpt demo` end to end on a tiny random model: the table, its JSON, reruns, bad folders."""

from __future__ import annotations

import json

import pytest

from skipgpt.cli import main
from skipgpt.commands.demo import prepare_demo_dir
from skipgpt.errors import SkipGPTError

TINY = [
    "--model", "random:llama",
    "--max-steps", "2", "--batch-size", "2", "--seq-len", "32",
    "--eval-seq-len", "64", "--eval-windows", "2", "--calibrate-blocks", "2",
]  # fmt: skip
ROWS = ["dense", "SkipGPT-RT (routers)", "random routing, same rates"]
SPARSITY_KEYS = {"module", "attn", "mlp", "params", "params_net"}


def test_demo_on_a_tiny_random_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", *TINY, "--output", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    result = json.loads((out / "results.json").read_text())
    assert printed == result
    assert [r["model"] for r in result["rows"]] == ROWS
    assert result["command"].startswith("skipgpt demo --model random:llama")
    assert "random:llama" in result["settings"] and "target 0.167 (params)" in result["settings"]
    assert "recipe frontier" in result["settings"] and "mixed precision no" in result["settings"]
    # the frontier recipe: linear routers, skipped MLPs run a closed-form substitute
    config = json.loads((out / "routers" / "skipgpt_config.json").read_text())["router_config"]
    assert (config["router_hidden"], config["mlp_skip_to"], config["substitute_init"]) == (
        0,
        "adapter",
        "closed-form",
    )
    dense, routed, rand = result["rows"]
    for row in result["rows"]:
        assert set(row["sparsity"]) == SPARSITY_KEYS  # per_layer is dropped from the table's JSON
        assert row["wiki-heldout ppl"] > 1 and row["ptb ppl"] > 1
    assert all(v == 0.0 for v in dense["sparsity"].values())
    # θ is calibrated to the target on training blocks: the routers really skip on PTB
    assert 0.0 < routed["sparsity"]["module"] < 1.0 and routed["sparsity"]["params"] > 0.0
    # a skipped MLP still runs its substitute: the net share is below the gross one
    assert 0.0 < routed["sparsity"]["params_net"] < routed["sparsity"]["params"]
    # random routing draws at the routers' own per-(layer, module) rates
    assert rand["sparsity"]["module"] == pytest.approx(routed["sparsity"]["module"], abs=0.1)

    md = (out / "results.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith(
        "| model | module sparsity | attn | mlp | param sparsity | net of substitutes |"
    )
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ROWS
    assert lines[2].startswith("| dense | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |")
    assert result["settings"] in md
    assert (out / "routers" / "skipgpt_config.json").exists()
    assert (out / "routers" / "routers.safetensors").exists()

    prepare_demo_dir(out)  # an earlier demo's folder is accepted: `make demo` can run twice


def test_demo_refuses_a_foreign_folder_before_any_work(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", *TINY, "--output", str(foreign)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SkipGPTError, match="is a file"):
        prepare_demo_dir(afile)
    assert prepare_demo_dir(tmp_path / "new") == tmp_path / "new"
