"""The command line's shared options: --device/--dtype, renamed flags and their hidden aliases,
help and defaults of every option, --config FILE, the --seq-len warning, --report-to."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import routed, tiny

import skipgpt.loading
from skipgpt.cli import COMMANDS, build_parser, main
from skipgpt.commands.common import (
    apply_config_file,
    available_devices,
    load_options,
    resolve_device,
    warn_if_beyond_positions,
)
from skipgpt.errors import SkipGPTError
from skipgpt.train.loop import LoopArgs

FIXTURES = Path(__file__).parent / "fixtures" / "folders"
ROUTED = str(FIXTURES / "routed")  # routers of random:llama

# the commands that load a model take --device and --dtype
LOADING_COMMANDS = [
    ["eval", "ppl"],
    ["eval", "zeroshot"],
    ["generate"],
    ["bench"],
    ["calibrate"],
    ["analyze"],
    ["train-router"],
    ["finetune-lora"],
    ["baseline", "shortgpt"],
    ["baseline", "llm-drop"],
    ["baseline", "mod"],
    ["compare"],
    ["frontier"],
    ["demo"],
]
# (command, new flag, old flag kept as a hidden alias)
RENAMES = [
    (["compare"], "--output", "--out"),
    (["frontier"], "--output", "--out"),
    (["analyze"], "--output", "--out"),
    (["compare"], "--target-sparsity", "--sparsity"),
    (["baseline", "shortgpt"], "--target-sparsity", "--sparsity"),
    (["baseline", "llm-drop"], "--target-sparsity", "--sparsity"),
    (["baseline", "mod"], "--target-sparsity", "--sparsity"),
    (["compare"], "--score-blocks", "--calib-blocks"),
    (["frontier"], "--score-blocks", "--calib-blocks"),
    (["baseline", "shortgpt"], "--score-blocks", "--calib-blocks"),
    (["calibrate"], "--calibrate-blocks", "--blocks"),
    (["train-router"], "--target-sparsity", "--sparsity"),
    (["demo"], "--target-sparsity", "--sparsity"),
    (["calibrate"], "--target-sparsity", "--sparsity"),
    (["finetune-lora"], "--target-sparsity", "--sparsity"),
    (["frontier"], "--target-sparsity", "--sparsity"),
]


def _subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _walk(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, (*path, name))
        elif action.option_strings and action.dest not in ("help", "version"):
            yield " ".join(path), action


# -- help and defaults -------------------------------------------------------------------------
def test_every_option_has_help_that_shows_its_default():
    missing, no_default = [], []
    for command, action in _walk(build_parser()):
        name = f"{command} {action.option_strings[0]}"
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(name)
        elif action.default not in (None, False, argparse.SUPPRESS) and "(default" not in action.help:
            no_default.append(name)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help does not show the default: {no_default}"


def test_every_help_page_renders_with_its_defaults():
    parser = _subparser(["train-router"])
    text = parser.format_help()
    assert "--target-sparsity" in text and "(default: 0.25)" in text.replace("\n", " ").replace("  ", " ")
    assert "--device" in text and "(default: cpu)" in " ".join(text.split())


def test_no_help_page_leaks_argparse_formatting():
    # a bare "%" in a help string is a format directive to argparse ("30% s..." printed the
    # action's whole __dict__ into train-router's --recipe help)
    def pages(parser, path=()):
        yield " ".join(path), parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from pages(child, (*path, name))

    leaked = [cmd for cmd, text in pages(build_parser()) if "option_strings" in text or "%(" in text]
    assert not leaked, f"help pages with argparse internals in them: {leaked}"


# -- renamed flags -----------------------------------------------------------------------------
@pytest.mark.parametrize("path,new,old", RENAMES, ids=[f"{' '.join(p)} {o}" for p, _, o in RENAMES])
def test_old_flag_names_are_hidden_aliases(path, new, old):
    parser = _subparser(path)
    assert old not in parser.format_help().split(), f"{old} is listed in --help"
    assert new in parser.format_help()
    action = parser._option_string_actions[new]
    assert parser._option_string_actions[old] is action
    required = [
        a
        for a in parser._actions
        if a.required and a is not action and a.option_strings and a.dest not in ("help",)
    ]
    argv = [tok for a in required for tok in (a.option_strings[0], "0.5" if "sparsity" in a.dest else "x")]
    value = "0.3" if "sparsity" in new else "7" if "blocks" in new else "somewhere"
    by_new = parser.parse_args([*argv, new, value])
    by_old = parser.parse_args([*argv, old, value])
    assert getattr(by_new, action.dest) == getattr(by_old, action.dest)
    assert str(getattr(by_old, action.dest)) in (value, str(float(value)) if value[0].isdigit() else value)


def _all_parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield from _all_parsers(command, (*path, name))


def test_no_command_accepts_an_abbreviated_option():
    # `train-router --sparsity-w 0.3` must not set --sparsity-weight, nor `--lr-sched` --lr-scheduler
    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) > len(COMMANDS)  # nested ones (baseline shortgpt, ...) too
    for path, parser in parsers:
        assert parser.allow_abbrev is False, " ".join(path)
    parser = _subparser(["train-router"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--output", "o", "--sparsity-w", "0.3"])
    args = parser.parse_args(["--model", "m", "--output", "o", "--sparsity", "0.3"])
    assert (args.target_sparsity, args.sparsity_weight) == (0.3, parser.get_default("sparsity_weight"))


# -- --device / --dtype ------------------------------------------------------------------------
@pytest.mark.parametrize("path", LOADING_COMMANDS, ids=[" ".join(p) for p in LOADING_COMMANDS])
def test_commands_that_load_a_model_take_device_and_dtype(path):
    parser = _subparser(path)
    assert parser._option_string_actions["--device"].default == "cpu"
    assert parser._option_string_actions["--dtype"].default == "float32"
    assert set(parser._option_string_actions["--dtype"].choices) == {"float32", "bfloat16", "float16"}


def test_device_is_validated_in_one_line():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("auto", "mps", "cpu")
    with pytest.raises(argparse.ArgumentTypeError, match="accepted: auto, cpu, cuda, cuda:N, mps"):
        resolve_device("gpu")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a CPU machine)
    with pytest.raises(SkipGPTError, match=f"--device {missing}: not available .*available: cpu") as e:
        resolve_device(missing)
    assert "\n" not in str(e.value)
    assert available_devices()[0] == "cpu"
    ns = argparse.Namespace()  # a namespace without the options: float32 on the CPU, as before
    assert load_options(ns) == {"dtype": torch.float32, "device_map": "cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    assert main(["eval", "ppl", "--model", "random:llama", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --device cuda: not available on this machine; available: " + ", ".join(
        available_devices()
    )


def _spy_load_model(monkeypatch) -> list:
    loaded = []
    real = skipgpt.loading.load_model

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        loaded.append(model)
        return model, tok

    monkeypatch.setattr(skipgpt.loading, "load_model", spy)
    return loaded


def _dtypes(model):
    routers = {p.dtype for n, p in model.named_parameters() if "routers" in n}
    base = {p.dtype for n, p in model.named_parameters() if "routers" not in n}
    return base, routers


def test_eval_ppl_on_cpu_in_bfloat16_keeps_routers_float32(monkeypatch, capsys):
    loaded = _spy_load_model(monkeypatch)
    argv = ["eval", "ppl", "--model", ROUTED, "--dataset", "calib", "--seq-len", "16", "--max-windows", "1"]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ppl"] > 1
    (model,) = loaded
    assert _dtypes(model) == ({torch.bfloat16}, {torch.float32})
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_generate_on_cpu_in_bfloat16_keeps_routers_float32(monkeypatch, capsys):
    loaded = _spy_load_model(monkeypatch)
    argv = ["generate", "--model", ROUTED, "--prompt", "hello", "--max-new-tokens", "4"]
    assert main([*argv, "--device", "cpu", "--dtype", "bfloat16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["completions"]) == 1
    (model,) = loaded
    assert _dtypes(model) == ({torch.bfloat16}, {torch.float32})


def test_dense_model_loads_in_the_dtype_asked(monkeypatch, capsys):
    loaded = _spy_load_model(monkeypatch)
    argv = ["generate", "--model", "random:llama", "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*argv, "--dtype", "float16", "--json"]) == 0
    assert {p.dtype for p in loaded[0].parameters()} == {torch.float16}


# -- routers keep float32 and sit with their layer ---------------------------------------------
def test_to_a_dtype_casts_the_base_but_keeps_the_routers_exactly():
    model, _ = routed()
    before = {k: v.clone() for k, v in model.router_state_dict().items()}
    model.to(torch.bfloat16)
    assert _dtypes(model) == ({torch.bfloat16}, {torch.float32})
    after = model.router_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # not rounded through bf16
    model.half()
    assert _dtypes(model) == ({torch.float16}, {torch.float32})
    model.float()
    assert _dtypes(model) == ({torch.float32}, {torch.float32})
    # a router cast on purpose keeps its dtype through later moves of the wrapper
    model.router_modules()[0].to(torch.bfloat16)
    model.to("cpu")
    assert {p.dtype for p in model.router_modules()[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.router_modules()[1].parameters()} == {torch.float32}


def test_to_and_load_model_agree_on_router_dtype():
    loaded, _ = skipgpt.loading.load_model(ROUTED, dtype=torch.bfloat16)
    cast, _ = skipgpt.loading.load_model(ROUTED)
    cast.to(torch.bfloat16)
    assert _dtypes(loaded) == _dtypes(cast) == ({torch.bfloat16}, {torch.float32})
    a, b = loaded.router_state_dict(), cast.router_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_to_keeps_router_gradients_float32():
    model, _ = routed()
    for p in model.router_parameters():
        p.grad = torch.ones_like(p)
    model.to(torch.bfloat16)
    assert {p.grad.dtype for p in model.router_parameters()} == {torch.float32}


def test_routers_are_placed_with_their_layer():
    """device_map="auto" splits layers across devices: each layer's routers go to its device
    (here layer 1 on 'meta', the others on the CPU)."""
    from skipgpt import SkipGPTConfig, get_skipgpt_model

    base, _ = tiny()
    base.model.layers[1].to("meta")
    model = get_skipgpt_model(base, SkipGPTConfig())
    devices = [{p.device.type for p in r.parameters()} for r in model.router_modules()]
    assert devices == [{"cpu"}, {"meta"}, {"cpu"}, {"cpu"}]


def test_a_model_split_across_devices_moves_inputs_to_each_routed_layer():
    """A base split by device_map (``hf_device_map`` names several devices): each routed layer gets
    a pre-hook that takes its inputs to its layer's device; the logits do not change."""
    base, _ = tiny()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    whole = routed()[0]
    base.hf_device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0}
    from skipgpt import SkipGPTConfig, get_skipgpt_model

    split = get_skipgpt_model(base, SkipGPTConfig())
    assert all(layer._forward_pre_hooks for layer in split.routed_layers)
    assert not any(layer._forward_pre_hooks for layer in whole.routed_layers)
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, whole(ids).logits)


# -- --config FILE -----------------------------------------------------------------------------
def _parse_with_config(argv):
    parser = build_parser()
    command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    given = apply_config_file(command, argv)
    return parser.parse_args(argv), given


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_gives_defaults_that_flags_override(tmp_path, suffix):
    values = {"max-steps": 7, "batch_size": 3, "target-sparsity": 0.4, "output": str(tmp_path / "o")}
    path = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    else:
        path.write_text(json.dumps(values))
    argv = ["train-router", "--model", "random:llama", "--config", str(path), "--max-steps", "2"]
    args, given = _parse_with_config(argv)
    assert (args.max_steps, args.batch_size, args.target_sparsity) == (2, 3, 0.4)  # the flag wins
    assert args.output == str(tmp_path / "o")  # a required option may come from the file
    assert given == {"max_steps", "batch_size", "target_sparsity", "output"}


def test_config_values_win_over_the_recipe(tmp_path):
    from skipgpt.commands.train_router import apply_recipe

    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.123\n")
    argv = ["train-router", "--model", "random:llama", "--config", str(path), "--output", "o"]
    argv += ["--recipe", "paper"]
    args, given = _parse_with_config(argv)
    args.argv, args.build_parser, args.from_config = argv, build_parser, given
    apply_recipe(args)
    assert args.lr == 0.123


@pytest.mark.parametrize("command", ["train-router", "finetune-lora", "compare", "frontier"])
def test_config_file_refuses_unknown_keys_in_one_line(tmp_path, capsys, command):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max-steps": 2, "bogus_option": 1}))
    assert main([command, "--model", "random:llama", "--config", str(path), "--output", "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --config {path}: unknown option(s) bogus_option; accepted: ")
    assert "\n" not in err and "output" in err


def test_config_file_bad_value_and_bad_yaml(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lr-scheduler: [unclosed\n")
    assert main(["train-router", "--model", "random:llama", "--config", str(path), "--output", "o"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    path.write_text("mixed-precision: fp8\n")
    assert main(["train-router", "--model", "random:llama", "--config", str(path), "--output", "o"]) == 2
    assert "mixed-precision='fp8'; accepted: auto, no, bf16, fp16" in capsys.readouterr().err
    path.write_text("target-sparsity: 1.5\n")
    assert main(["train-router", "--model", "random:llama", "--config", str(path), "--output", "o"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --config {path}: target-sparsity: 1.5 is outside (0, 1); give a fraction strictly between 0 and 1"
    )


# -- --seq-len beyond the model's positions ----------------------------------------------------
def test_seq_len_beyond_positions_warns_in_one_line(capsys):
    model, _ = tiny()  # 512 positions
    assert not warn_if_beyond_positions(model, 512)
    assert capsys.readouterr().err == ""
    assert warn_if_beyond_positions(model, 513)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: --seq-len 513 exceeds the model's 512 positions")


def test_eval_ppl_warns_about_a_long_seq_len(capsys):
    argv = ["eval", "ppl", "--model", "random:llama", "--dataset", "calib", "--seq-len", "520"]
    assert main([*argv, "--max-windows", "1", "--json"]) == 0
    assert "warning: --seq-len 520 exceeds the model's 512 positions" in capsys.readouterr().err


# -- --report-to -------------------------------------------------------------------------------
def test_report_to_is_a_training_option():
    for path in (["train-router"], ["finetune-lora"]):
        action = _subparser(path)._option_string_actions["--report-to"]
        assert action.default == "none" and set(action.choices) == {"none", "tensorboard", "wandb"}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_report_to_without_the_package_is_a_one_line_error(tmp_path, capsys):
    argv = ["train-router", "--model", "random:llama", "--output", str(tmp_path / "o"), "--report-to"]
    assert main([*argv, "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: --report-to tensorboard needs the package 'tensorboard'") and "\n" not in err
    )
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_tensorboard_logs_every_step(tmp_path):
    out = tmp_path / "o"
    argv = ["train-router", "--model", "random:llama", "--output", str(out), "--seq-len", "16"]
    argv += ["--max-blocks", "4", "--batch-size", "2", "--max-steps", "2", "--report-to", "tensorboard"]
    assert main(argv) == 0
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events


def test_report_to_does_not_block_resume():
    from skipgpt.train.loop import _differing_settings

    saved = {**LoopArgs().__dict__, "report_to": "none"}
    assert _differing_settings(saved, {**saved, "report_to": "tensorboard"}) == []


@pytest.mark.filterwarnings("ignore:`log_with=tensorboard` was passed")  # the package is absent
def test_report_to_logs_every_step_through_accelerate(tmp_path, monkeypatch):
    """The loop's tracker plumbing, without the tracker's package: init_trackers once, log per
    step with the step's metrics, end_training at the end (accelerate's calls recorded)."""
    import accelerate

    import skipgpt.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "_installed", lambda package: True)
    monkeypatch.setattr(
        accelerate.Accelerator,
        "init_trackers",
        lambda self, name, config=None: calls.append(("init", name, config)),
    )
    monkeypatch.setattr(
        accelerate.Accelerator, "log", lambda self, values, step=None: calls.append(("log", step, values))
    )
    monkeypatch.setattr(accelerate.Accelerator, "end_training", lambda self: calls.append(("end",)))
    from skipgpt.train.router_tuning import train_routers

    model, _ = routed()
    blocks = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    args = LoopArgs(max_steps=2, batch_size=2, report_to="tensorboard")
    train_routers(model, blocks, tmp_path / "rt", args)
    assert [c[0] for c in calls] == ["init", "log", "log", "end"]
    assert calls[0][1] == "rt" and calls[0][2]["report_to"] == "tensorboard"
    assert [c[1] for c in calls[1:3]] == [0, 1] and "lr" in calls[1][2]
