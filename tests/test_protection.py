"""Protected modules (``SkipGPTConfig.protected_modules``, ``train-router --protect K``): modules
whose router is constant (execute) and never trains, so no training can learn to skip them.

Tested: the config accepts pairs and refuses anything else in one line; the routers answer
execute for every token at any θ and stay frozen through training while the others learn; the
folder keeps them; ``--protect K`` picks the K modules of highest LLM-Drop importance and refuses
a K out of range before writing anything.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import routed

from skipgpt import SkipGPTConfig, SkipGPTModel
from skipgpt.baselines.llm_drop import module_importance
from skipgpt.cli import main
from skipgpt.config import CONFIG_NAME
from skipgpt.data import load_blocks
from skipgpt.errors import SkipGPTError
from skipgpt.specs import load_base_model
from skipgpt.train.loop import LoopArgs
from skipgpt.train.router_tuning import train_routers

TEXT = " ".join(f"word{i % 97} tok{i % 13} and more {i % 7}." for i in range(3000))
PROTECTED = ((0, "mlp"), (1, "attn"))


def test_config_takes_pairs_and_round_trips():
    config = SkipGPTConfig(protected_modules=[[1, "attn"], [0, "mlp"], [0, "mlp"]])
    assert config.protected_modules == PROTECTED  # sorted, duplicates dropped
    again = SkipGPTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize(
    "bad", [[[0, "ffn"]], [["0", "mlp"]], [[-1, "mlp"]], [[True, "mlp"]], "0.mlp", [[0]], [[0, "mlp", 1]]]
)
def test_config_refuses_bad_pairs_in_one_line(bad):
    with pytest.raises(SkipGPTError, match="protected_modules must be a list of") as e:
        SkipGPTConfig(protected_modules=bad)
    assert "\n" not in str(e.value)


def test_a_protected_module_of_a_layer_the_model_lacks_is_refused():
    with pytest.raises(SkipGPTError, match="beyond the model's"):
        routed(protected_modules=[[99, "mlp"]])


def test_protected_routers_always_execute_and_never_train(tmp_path):
    model, tok = routed(protected_modules=PROTECTED)
    d = model.config.hidden_size
    hidden = 100 * torch.randn(2, 7, d)
    for layer in model.routed_layers:
        for m, router in layer.routers.items():
            p = router.execute_probability(hidden)
            if (layer.layer_idx, m) in PROTECTED:
                assert bool((p >= 1 - 1e-12).all()), (layer.layer_idx, m)
    before = {k: v.detach().clone() for k, v in model.router_state_dict().items()}
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    blocks = load_blocks(str(data), tok, 16, max_blocks=8)
    train_routers(
        model,
        blocks,
        tmp_path / "out",
        LoopArgs(max_steps=2, batch_size=2, mixed_precision="no"),
        progress=False,
    )
    after = model.router_state_dict()
    for key, value in after.items():
        layer, module = int(key.split(".")[1]), key.split(".")[2]
        frozen = (layer, module) in PROTECTED
        assert torch.equal(value, before[key]) == frozen, key
        assert value.requires_grad == (not frozen), key
    # at the highest θ every other module is skipped; the protected ones still run for every token
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    model.reset_stats()
    with torch.no_grad(), model.routing(threshold=1.0):
        model(input_ids=ids)
    skipped = model.routing_stats.skipped
    for pair in PROTECTED:
        assert skipped[pair] == 0, pair
    loaded = SkipGPTModel.from_pretrained(str(tmp_path / "out"), load_base_model("random:llama")[0])
    assert loaded.skipgpt_config.protected_modules == PROTECTED
    for key, value in loaded.router_state_dict().items():
        assert torch.equal(value, after[key]), key


def _train(tmp_path, *extra):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "protected"
    argv = ["train-router", "--model", "random:llama", "--dataset", str(data), "--seq-len", "16"]
    argv += ["--max-blocks", "12", "--max-steps", "2", "--batch-size", "2", "--mixed-precision", "no"]
    argv += ["--output", str(out), *extra]
    return main(argv), out, data


def test_cli_protects_the_k_most_important_modules(tmp_path):
    rc, out, data = _train(tmp_path, "--protect", "3")
    assert rc == 0
    record = json.loads((out / CONFIG_NAME).read_text())
    base, tok = load_base_model("random:llama")
    scores = module_importance(base, load_blocks(str(data), tok, 16, max_blocks=12)[:32], progress=False)
    top3 = sorted(sorted(scores, key=scores.get, reverse=True)[:3])
    assert [tuple(p) for p in record["router_config"]["protected_modules"]] == top3
    assert [tuple(p) for p in record["metadata"]["protection"]["modules"]] == top3
    model = SkipGPTModel.from_pretrained(str(out))
    assert model.skipgpt_config.protected_modules == tuple(top3)


@pytest.mark.parametrize("k", ["-1", "8"])
def test_cli_refuses_a_k_out_of_range_and_writes_nothing(tmp_path, capsys, k):
    rc, out, _ = _train(tmp_path, "--protect", k)  # random:llama: 4 layers, 8 routed modules
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "--protect must be in 1..7" in err[-1]
    assert not out.exists() or not any(out.iterdir())
