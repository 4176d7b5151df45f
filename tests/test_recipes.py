"""One source of training defaults: named recipes, CLI flags generated from the dataclasses,
the Python API training what `skipgpt train-router` trains, and the `alpha` rename."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from skipgpt import SkipGPTConfig, SkipGPTModel, get_skipgpt_model
from skipgpt.cli import build_parser, main
from skipgpt.commands.dataclass_args import cli_fields, dataclass_from_args, dest_of, flag_of
from skipgpt.commands.train_router import (
    apply_recipe,
    loop_args_from_args,
    router_config_from_args,
    tuning_args_from_args,
)
from skipgpt.config import CONFIG_NAME
from skipgpt.data import load_blocks
from skipgpt.errors import SkipGPTError
from skipgpt.model import ROUTERS_NAME
from skipgpt.specs import load_base_model
from skipgpt.train.loop import LoopArgs
from skipgpt.train.lora import LoraArgs
from skipgpt.train.recipes import LORA_LOOP, RECIPES, get_recipe
from skipgpt.train.router_tuning import RouterTuningArgs, train_routers

TEXT = " ".join(f"word{i % 97} tok{i % 13}" for i in range(3000))


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.argv, args.build_parser = argv, build_parser  # as cli.main sets them
    return args


# -- the Python API trains what the CLI trains ------------------------------------------------------
def test_python_api_and_cli_give_identical_routers(tmp_path, monkeypatch):
    """train_routers with no extra arguments == `skipgpt train-router` with no recipe flags."""
    # both resolve --mixed-precision auto alike; fp32 keeps the comparison exact (bf16 kernels may differ in rounding)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    common = {"max_steps": 3, "batch_size": 2, "seed": 0}
    argv = ["train-router", "--model", "random:llama", "--dataset", str(data), "--seq-len", "16"]
    argv += ["--max-blocks", "12", "--output", str(tmp_path / "cli")]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    assert main(argv) == 0

    torch.manual_seed(0)  # as the command does before it loads the base model
    base, tok = load_base_model("random:llama")
    blocks = load_blocks(str(data), tok, 16, max_blocks=12)
    model = get_skipgpt_model(base, SkipGPTConfig(), base_spec="random:llama")
    train_routers(model, blocks, tmp_path / "api", LoopArgs(**common), progress=False)

    cli = load_file(str(tmp_path / "cli" / ROUTERS_NAME))
    api = load_file(str(tmp_path / "api" / ROUTERS_NAME))
    assert cli.keys() == api.keys() and cli
    for k in cli:
        assert torch.equal(cli[k], api[k]), k
    records = [json.loads((tmp_path / d / CONFIG_NAME).read_text()) for d in ("cli", "api")]
    assert records[0]["router_config"] == records[1]["router_config"]  # θ calibrated alike too
    meta = [r["metadata"] for r in records]
    assert meta[0]["router_tuning"] == meta[1]["router_tuning"] == dataclasses.asdict(RouterTuningArgs())
    assert meta[0]["loop"] == meta[1]["loop"]


@pytest.mark.parametrize("collapse_ratio", [5.0, 0.5])
def test_train_router_reports_routed_and_dense_ppl_and_warns_of_a_collapse(
    tmp_path, monkeypatch, capsys, collapse_ratio
):
    import skipgpt.commands.train_router as command

    monkeypatch.setattr(command, "COLLAPSE_RATIO", collapse_ratio)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "routers"
    argv = ["train-router", "--model", "random:llama", "--dataset", str(data), "--seq-len", "16"]
    argv += ["--max-blocks", "12", "--max-steps", "2", "--batch-size", "2", "--output", str(out), "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])

    # the dense PPL is the base model's on the same blocks, the routed one the saved routers'
    base, tok = load_base_model("random:llama")
    few = load_blocks(str(data), tok, 16, max_blocks=12)[: command.CHECK_BLOCKS]
    from skipgpt.eval.perplexity import evaluate_perplexity

    assert summary["dense_ppl"] == pytest.approx(
        evaluate_perplexity(base, few, progress=False)["ppl"], rel=1e-4
    )
    routed = SkipGPTModel.from_pretrained(str(out), base)
    assert summary["ppl"] == pytest.approx(evaluate_perplexity(routed, few, progress=False)["ppl"], rel=1e-4)
    ratio = summary["ppl"] / summary["dense_ppl"]
    assert (ratio > collapse_ratio) == ("likely collapsed" in captured.err), (ratio, captured.err)


def test_default_recipe_is_the_dataclass_defaults_and_the_cli_defaults():
    recipe = RECIPES["default"]
    assert (
        recipe.router == SkipGPTConfig() and recipe.tuning == RouterTuningArgs() and recipe.loop == LoopArgs()
    )
    # the recipe that learns on small models: self-distillation, curriculum, dense-start routers
    assert RouterTuningArgs().distill_weight == 1.0 and RouterTuningArgs().curriculum == 0.3
    assert SkipGPTConfig().router_init == "dense" and SkipGPTConfig().execute_bias == 3.0
    args = _parse(["train-router", "--model", "m", "--output", "o"])
    apply_recipe(args)
    assert router_config_from_args(args) == SkipGPTConfig()
    assert tuning_args_from_args(args) == RouterTuningArgs()
    assert loop_args_from_args(args) == LoopArgs()


def test_paper_recipe_from_python_and_from_the_flag():
    paper = get_recipe("paper")
    assert paper.config().router_init == "paper"
    assert (paper.tuning.distill_weight, paper.tuning.curriculum) == (0.0, 0.0)
    args = _parse(["train-router", "--model", "m", "--output", "o", "--recipe", "paper"])
    apply_recipe(args)
    assert router_config_from_args(args) == paper.router
    assert tuning_args_from_args(args) == paper.tuning
    # a flag given beside the recipe wins over it, before or after --recipe
    for argv in (["--curriculum", "0.5", "--recipe", "paper"], ["--recipe", "paper", "--curriculum", "0.5"]):
        args = _parse(["train-router", "--model", "m", "--output", "o", *argv])
        apply_recipe(args)
        assert tuning_args_from_args(args) == dataclasses.replace(paper.tuning, curriculum=0.5)
    with pytest.raises(SkipGPTError, match="unknown recipe 'nope'; accepted: default, paper"):
        get_recipe("nope")


# -- flags generated from the dataclasses ------------------------------------------------------------
@pytest.mark.parametrize(
    "command, cls",
    [
        ("train-router", SkipGPTConfig),
        ("train-router", RouterTuningArgs),
        ("train-router", LoopArgs),
        ("finetune-lora", LoraArgs),
        ("finetune-lora", LoopArgs),
    ],
)
def test_every_cli_field_has_a_flag_with_the_field_default(command, cls):
    parser = _subparser(command)
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    base = {"finetune-lora": LORA_LOOP}.get(command, cls()) if cls is LoopArgs else cls()
    assert cli_fields(cls)
    for f in cli_fields(cls):
        action = by_flag.get(flag_of(f))
        assert action is not None, f"{cls.__name__}.{f.name} has no {flag_of(f)} in {command}"
        assert action.dest == dest_of(f)
        if f.name == "mixed_precision":  # the field stores its resolved value; the flag says auto
            assert action.default == "auto"
            continue
        value = getattr(base, f.name)
        assert action.default == (",".join(value) if isinstance(value, tuple) else value), f.name
        if "choices" in f.metadata:
            assert list(action.choices) == list(f.metadata["choices"])


def test_flags_are_checked_by_their_named_types(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["train-router", "--model", "m", "--output", "o", "--target-sparsity", "1.5"]
        )
    assert "outside (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-router", "--model", "m", "--output", "o", "--router-init", "zeros"])
    assert "invalid choice" in capsys.readouterr().err


def test_defaults_show_in_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-router", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.3)" in out and "(default: dense)" in out and "(default: 20.0)" in out


def test_dataclass_from_args_keeps_defaults_and_base_for_missing_flags():
    args = argparse.Namespace(max_steps=7, lr=0.5)
    assert dataclass_from_args(LoopArgs, args) == LoopArgs(max_steps=7, lr=0.5)
    assert dataclass_from_args(LoopArgs, args, base=LORA_LOOP) == dataclasses.replace(
        LORA_LOOP, max_steps=7, lr=0.5
    )
    assert dataclass_from_args(LoopArgs, args, seed=3).seed == 3
    # a field without CLI metadata is never read from args (--seed is the loop's, not the routers')
    assert dataclass_from_args(SkipGPTConfig, argparse.Namespace(seed=5)).seed == 0


def test_lora_flags_build_lora_args():
    argv = ["finetune-lora", "--model", "m", "--output", "o", "--lora-r", "4", "--lora-alpha", "8"]
    argv += ["--lora-targets", "q_proj", "--stage2-routing", "sampled", "--stage2-distill-weight", "0.5"]
    from skipgpt.commands.finetune_lora import lora_args_from_args

    args = _parse(argv)
    lora = lora_args_from_args(args)
    assert lora == LoraArgs(targets=("q_proj",), r=4, lora_alpha=8.0, routing="sampled", distill_weight=0.5)
    loop = loop_args_from_args(args)
    assert (loop.lr, loop.lr_scheduler, loop.warmup_ratio) == (2e-4, "cosine", 0.1)


@pytest.mark.parametrize("command", ["compare", "demo", "baseline mod"])
def test_other_training_commands_build_the_same_loop(command, monkeypatch):
    """compare, demo and MoD-D take scheduler, warm-up and mixed precision like train-router."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    argv = [*command.split(), "--model", "m", "--lr-scheduler", "cosine", "--warmup-ratio", "0.2"]
    argv += {"compare": ["--out", "o"], "demo": [], "baseline mod": ["--sparsity", "0.2", "--output", "o"]}[
        command
    ]
    loop = loop_args_from_args(_parse(argv))
    assert (loop.lr_scheduler, loop.warmup_ratio, loop.mixed_precision) == ("cosine", 0.2, "bf16")


# -- alpha -> sparsity_weight ----------------------------------------------------------------------
def test_alpha_flag_is_an_alias_of_sparsity_weight():
    args = _parse(["train-router", "--model", "m", "--output", "o", "--alpha", "7"])
    assert router_config_from_args(args).sparsity_weight == 7.0
    args = _parse(["compare", "--model", "m", "--out", "o", "--alpha", "7"])
    assert args.sparsity_weight == 7.0


def test_old_config_with_alpha_loads(tmp_path):
    old = SkipGPTConfig(sparsity_weight=7.0).to_dict()
    old["alpha"] = old.pop("sparsity_weight")
    assert SkipGPTConfig.from_dict(old) == SkipGPTConfig(sparsity_weight=7.0)
    with pytest.raises(SkipGPTError, match="both 'alpha' and its new name 'sparsity_weight'"):
        SkipGPTConfig.from_dict(old | {"sparsity_weight": 1.0})

    base, _ = load_base_model("random:llama")
    model = get_skipgpt_model(
        base.eval(), SkipGPTConfig(sparsity_weight=7.0), base_spec="random:llama"
    ).eval()
    model.save_pretrained(tmp_path / "m")
    record = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    record["router_config"]["alpha"] = record["router_config"].pop("sparsity_weight")  # today's folders
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(record))
    loaded = SkipGPTModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.skipgpt_config.sparsity_weight == 7.0
    ids = torch.randint(3, base.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_default_router_is_linear_and_older_configs_keep_d4(tmp_path):
    from skipgpt.train.recipes import RECIPES

    assert SkipGPTConfig().router_hidden == 0 and RECIPES["default"].config().router_hidden == 0
    assert RECIPES["paper"].config().router_hidden is None  # the paper's code: d/4
    # a folder saved before linear routers became the default has no router_hidden: it meant d/4
    base, _ = load_base_model("random:llama")
    model = get_skipgpt_model(
        base.eval(), SkipGPTConfig(router_hidden=None, router_init="paper"), base_spec="random:llama"
    ).eval()
    model.save_pretrained(tmp_path / "m")
    record = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    del record["router_config"]["router_hidden"]
    (tmp_path / "m" / CONFIG_NAME).write_text(json.dumps(record))
    loaded = SkipGPTModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.skipgpt_config.router_hidden is None
    ids = torch.randint(3, base.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# -- cli: optional dependencies --------------------------------------------------------------------
def test_missing_optional_dependency_names_its_extra(monkeypatch, capsys):
    import skipgpt.commands.analyze as analyze

    def needs(name):
        def run(args):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)

        return run

    monkeypatch.setattr(analyze, "run", needs("matplotlib.pyplot"))
    parser = build_parser()
    monkeypatch.setattr("skipgpt.cli.build_parser", lambda: parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["analyze"].set_defaults(func=analyze.run)
    argv = ["analyze", *_required(sub.choices["analyze"])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs the optional package 'matplotlib.pyplot'" in err and "pip install 'skipgpt[eval]'" in err
    sub.choices["analyze"].set_defaults(func=needs("not_a_skipgpt_dependency"))
    with pytest.raises(ModuleNotFoundError):  # a real import error is not hidden
        main(argv)


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the required options of ``parser``."""
    out = []
    for a in parser._actions:
        if a.required and a.option_strings:
            out += [a.option_strings[0], "x"]
        elif a.required and not a.option_strings and not isinstance(a, argparse._SubParsersAction):
            out.append("x")
    return out
