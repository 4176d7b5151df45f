"""Bad input ends in one ``error:`` line and exit status 2, never a traceback or a silent result."""

from __future__ import annotations

import json

import pytest
import torch

from skipgpt.cli import main
from skipgpt.config import CONFIG_NAME, SkipGPTConfig
from skipgpt.data import load_texts, pack_blocks
from skipgpt.errors import SkipGPTError
from skipgpt.train.loop import CHECKPOINT_DIR, LoopArgs, claim_output_dir, train_loop


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], captured.err
    return lines[0]


# -- data files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_text_is_refused_in_one_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    body = '{"text": "caf\xe9"}\n' if suffix == ".jsonl" else "caf\xe9 cr\xe8me"
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(SkipGPTError, match="is not UTF-8 text") as err:
        load_texts(str(path))
    assert "\n" not in str(err.value)


def test_corrupt_parquet_is_refused_in_one_line(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(SkipGPTError, match=r"cannot read .*broken\.parquet \(Arrow"):
        load_texts(str(path))


def test_non_utf8_data_through_the_cli_exits_2(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert main(["eval", "ppl", "--model", "random:llama", "--dataset", str(path), "--seq-len", "8"]) == 2
    assert "is not UTF-8 text" in one_error_line(capsys)


# -- sequence length -----------------------------------------------------------------------------
def test_seq_len_below_two_is_refused(tmp_path, capsys):
    class Tok:
        bos_token_id, eos_token_id = 1, 2

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[5, 6, 7] for _ in texts]}

    with pytest.raises(SkipGPTError, match="seq_len must be >= 2"):
        pack_blocks(["a b c"], Tok(), 1)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "ppl", "--model", "random:llama", "--dataset", "ptb", "--seq-len", "1"])
    assert exc.value.code == 2
    assert "--seq-len: 1 must be >= 2" in capsys.readouterr().err


# -- skipgpt_config.json with wrong types ----------------------------------------------------------
def _folder(tmp_path, **changes):
    model_dir = tmp_path / "routed"
    model_dir.mkdir()
    record = {
        "base_model": "random:llama",
        "model_type": "llama",
        "num_layers": 2,
        "router_config": SkipGPTConfig().to_dict(),
        "metadata": {},
    }
    for key, value in changes.items():
        if key == "modules":
            record["router_config"]["modules"] = value
        else:
            record[key] = value
    (model_dir / CONFIG_NAME).write_text(json.dumps(record))
    return model_dir


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"modules": 5}, "modules must be a list"),
        ({"modules": [1, 2]}, "modules must be a list"),
        ({"metadata": "a string"}, "'metadata' must be an object or null"),
        ({"num_layers": "four"}, "'num_layers' must be a positive integer"),
        ({"router_config": ["attn"]}, "'router_config' must be an object or null"),
    ],
)
def test_config_record_with_wrong_types_is_refused(tmp_path, capsys, changes, message):
    folder = _folder(tmp_path, **changes)
    assert main(["eval", "ppl", "--model", str(folder), "--dataset", "ptb", "--max-windows", "1"]) == 2
    assert message in one_error_line(capsys)


def test_config_record_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(SkipGPTError, match="must hold a JSON object"):
        SkipGPTConfig.read_json(tmp_path / CONFIG_NAME)


# -- generate ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "  "], "--prompt number 1 is empty"),
        (
            ["--prompt", "hi", "--do-sample", "--temperature", "0"],
            "--temperature: 0 must be a finite number > 0",
        ),
        (["--prompt", "hi", "--do-sample", "--temperature", "nan"], "--temperature: nan must be a finite"),
        (["--prompt", "hi", "--top-p", "1.5"], "--top-p: 1.5 is outside (0, 1]"),
        (["--prompt", "hi", "--max-new-tokens", "100000"], "exceeds the model's"),
    ],
)
def test_generate_refuses_bad_prompts_and_sampling_options(capsys, extra, message):
    try:
        code = main(["generate", "--model", "random:llama", *extra])
    except SystemExit as exc:  # argparse's own refusals: its usage, then one error line
        assert exc.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
        return
    assert code == 2
    assert message in one_error_line(capsys)


# -- training outputs ----------------------------------------------------------------------------
def test_interrupted_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    (out / CHECKPOINT_DIR / "trainer_state.json").write_text("{}")
    with pytest.raises(SkipGPTError, match="interrupted run .* pass --resume .* or --overwrite"):
        claim_output_dir(out, resume=False, overwrite=False)
    assert claim_output_dir(out, resume=True, overwrite=False) == out
    assert claim_output_dir(out, resume=False, overwrite=True) == out


def test_unwritable_output_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SkipGPTError, match="cannot write to"):
        claim_output_dir(blocker / "sub" / "run", resume=False, overwrite=False)
    assert not (blocker.parent / "sub").exists()


def _toy_loop(tmp_path, loss_value: float, **loop):
    weight = torch.nn.Parameter(torch.ones(3))
    model = torch.nn.Linear(3, 3)

    def step_fn(forward, batch, step):
        return (weight.sum() * 0 + loss_value), {"loss": loss_value}

    args = LoopArgs(**{"max_steps": 4, "batch_size": 2, "save_every": 2, **loop})
    blocks = torch.zeros(8, 4, dtype=torch.long)
    return lambda **kw: train_loop(
        model, {"w": weight}, blocks, args, step_fn, tmp_path, progress=False, **kw
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_training_with_a_clear_error(tmp_path, bad):
    with pytest.raises(SkipGPTError, match=r"training loss is (nan|inf) at step 0; stopped"):
        _toy_loop(tmp_path, bad)()
    assert not (tmp_path / CHECKPOINT_DIR).exists()


def test_resume_names_the_setting_that_differs_and_ignores_save_every(tmp_path):
    _toy_loop(tmp_path, 1.0)()
    with pytest.raises(SkipGPTError, match=r"they differ in lr \(checkpoint 0.002, now 0.01\)$"):
        _toy_loop(tmp_path, 1.0, lr=0.01)(resume=True)
    _toy_loop(tmp_path, 1.0, save_every=1)(resume=True)  # a checkpoint cadence changes no result
