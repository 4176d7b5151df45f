"""``train-router --remove-layers K``: ShortGPT's K layers deleted first, routers tuned on the rest.

The folder is a routed one (not LLM-Drop's), records which layers went and why, loads with them
gone, counts them in every sparsity, and its dense reference (and distillation teacher) is the
full base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from skipgpt import SkipGPTModel, checkpoint
from skipgpt.baselines.shortgpt import lowest_influence_layers
from skipgpt.cli import main
from skipgpt.config import CONFIG_NAME
from skipgpt.data import load_blocks
from skipgpt.specs import load_base_model
from skipgpt.train.losses import curriculum_target

TEXT = " ".join(f"word{i % 97} tok{i % 13} and more {i % 7}." for i in range(3000))


def _train(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "hybrid"
    argv = ["train-router", "--model", "random:llama", "--dataset", str(data), "--seq-len", "16"]
    argv += ["--max-blocks", "12", "--max-steps", "3", "--batch-size", "2", "--mixed-precision", "no"]
    argv += ["--recipe", "frontier", "--output", str(out), *extra]
    return main(argv), out


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> Path:
    rc, out = _train(tmp_path_factory.mktemp("hybrid"), "--remove-layers", "1", "--target-sparsity", "0.5")
    assert rc == 0
    return out


def test_removes_shortgpts_choice_and_records_it(hybrid):
    base, tokenizer = load_base_model("random:llama")
    blocks = load_blocks(str(hybrid.parent / "text.txt"), tokenizer, 16, max_blocks=12)
    expected, bi = lowest_influence_layers(base, blocks[:32], 1, progress=False)
    raw = json.loads((hybrid / CONFIG_NAME).read_text())
    assert raw["removed_modules"] == [[expected[0], "attn"], [expected[0], "mlp"]]
    removal = raw["metadata"]["layer_removal"]
    assert removal["removed_layers"] == expected and removal["block_influence"] == pytest.approx(bi)
    assert checkpoint.read(hybrid).kind == "routed"  # routers trained around it: not LLM-Drop


def test_loads_with_the_layer_gone_and_dense_is_the_base_model(hybrid):
    model = SkipGPTModel.from_pretrained(hybrid).eval()
    gone = json.loads((hybrid / CONFIG_NAME).read_text())["metadata"]["layer_removal"]["removed_layers"]
    assert model.routing_settings.removed == {(gone[0], "attn"), (gone[0], "mlp")}
    base, _ = load_base_model("random:llama")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.dense():
            dense = model(input_ids=ids).logits
            dense_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        routed = model(input_ids=ids).logits
        stats = model.sparsity_stats()
        assert torch.allclose(dense, base.eval()(input_ids=ids).logits, atol=1e-5)
        assert torch.equal(dense_tokens, base.generate(ids, max_new_tokens=4, do_sample=False))
    assert not torch.allclose(routed, dense, atol=1e-3)  # the layer really is gone when routing
    assert all(stats["per_layer"][m][gone[0]] == 1.0 for m in ("attn", "mlp"))
    assert model.removed_sparsity("modules") == pytest.approx(1 / 4)  # 1 of random:llama's 4 layers


def test_fast_path_equals_the_reference_with_layers_removed(hybrid):
    model = SkipGPTModel.from_pretrained(hybrid).eval()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    outs = {}
    with torch.no_grad():
        for execution in ("fast", "masked"):
            with model.routing(execution=execution, threshold=0.5):
                logits = model(input_ids=ids).logits
                tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
            outs[execution] = logits, tokens
    assert torch.allclose(outs["fast"][0], outs["masked"][0], atol=1e-5)
    assert torch.equal(outs["fast"][1], outs["masked"][1])


def test_curriculum_starts_at_the_removed_share():
    assert curriculum_target(0.3, 0, 100, 0.3, start=0.2) == pytest.approx(0.2)
    assert curriculum_target(0.3, 15, 100, 0.3, start=0.2) == pytest.approx(0.25)
    assert curriculum_target(0.3, 50, 100, 0.3, start=0.2) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--remove-layers", "4", "--target-sparsity", "0.5"], "--remove-layers must be in 1..3"),
        (["--remove-layers", "3", "--target-sparsity", "0.5"], "more than --target-sparsity 0.5"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    rc, out = _train(tmp_path, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_removed_attention_saves_its_kv_projections_in_the_cost_model():
    from skipgpt.costs import CostModel, ForwardRecord, routing_cost

    cost = CostModel.from_config(load_base_model("random:llama")[0].config)
    skip = {(0, "attn"): torch.zeros(1, 8, dtype=torch.bool), (0, "mlp"): torch.zeros(1, 8, dtype=torch.bool)}
    routed = routing_cost(cost, [ForwardRecord(1, 8, execute=skip)])
    gone = routing_cost(cost, [ForwardRecord(1, 8, execute=skip)], removed=[(0, "attn"), (0, "mlp")])
    assert gone["skipped_flops"] - routed["skipped_flops"] == 8 * cost.k_v  # a routed skip writes K/V
    assert gone["ideal_speedup"] > routed["ideal_speedup"]


def test_calibration_counts_the_removed_layers_in_the_target(hybrid):
    from skipgpt.calibration import calibrate_threshold

    model = SkipGPTModel.from_pretrained(hybrid).eval()
    _, tokenizer = load_base_model("random:llama")
    blocks = load_blocks(str(hybrid.parent / "text.txt"), tokenizer, 16, max_blocks=12)
    floor = model.removed_sparsity("params")
    for target in (floor + 0.1, floor + 0.3):
        calibrate_threshold(model, blocks, target, budget="params", tolerance=0.02)
        model.reset_stats()
        with torch.no_grad():
            model(input_ids=blocks)
        assert model.sparsity_stats()["params"] == pytest.approx(target, abs=0.03)


def test_serving_refuses_a_folder_with_removed_modules(hybrid, tmp_path):
    from skipgpt.errors import SkipGPTError
    from skipgpt.serving.prepare import prepare_serving_folder

    with pytest.raises(SkipGPTError, match="modules removed"):
        prepare_serving_folder(hybrid, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_stage2_lora_on_it_stays_routed_with_the_layer_gone(hybrid, tmp_path):
    out = tmp_path / "lora"
    argv = ["finetune-lora", "--model", str(hybrid), "--dataset", str(hybrid.parent / "text.txt")]
    argv += [
        "--seq-len",
        "16",
        "--max-blocks",
        "12",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--lora-r",
        "4",
    ]
    assert main([*argv, "--mixed-precision", "no", "--output", str(out)]) == 0
    record = checkpoint.read(out)
    assert record.kind == "routed-lora"
    assert record.removed_modules == checkpoint.read(hybrid).removed_modules
