"""Multi-process training, mixed precision and gradient checkpointing of the shared training loop."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_ids, routed

from skipgpt.errors import SkipGPTError
from skipgpt.train.loop import LoopArgs, batch_indices, make_accelerator, set_gradient_checkpointing
from skipgpt.train.router_tuning import RouterTuningArgs, train_routers

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ranks_shard_the_global_batch_like_accumulation_micro_steps():
    """N ranks × batch B/N see exactly the blocks one process sees with B/N × N accumulation."""
    args = LoopArgs(batch_size=3, grad_accum=1, seed=5)
    accum = LoopArgs(batch_size=3, grad_accum=2, seed=5)
    for step in range(4):
        ranks = [batch_indices(10, step, 0, r, args, world=2) for r in range(2)]
        micros = [batch_indices(10, step, m, 0, accum, world=1) for m in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(ranks, micros, strict=True))
    # one epoch covers every block once, whatever the sharding
    seen = torch.cat([batch_indices(12, s, 0, r, args, world=2) for s in range(2) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(12))


def test_mixed_precision_is_validated():
    with pytest.raises(SkipGPTError, match="mixed_precision must be one of"):
        LoopArgs(mixed_precision="fp8")
    if not torch.accelerator.is_available():
        with pytest.raises(SkipGPTError, match="fp16 needs a GPU"):
            make_accelerator("fp16")
    assert make_accelerator("no").mixed_precision == "no"  # the state can change back


def test_auto_mixed_precision_follows_the_launcher_then_the_hardware(monkeypatch):
    import skipgpt.train.loop as loop_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    assert LoopArgs().mixed_precision == "fp16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(loop_module, "cpu_has_native_bf16", lambda native=native: native)
        assert LoopArgs().mixed_precision == expected
        assert LoopArgs(mixed_precision="no").mixed_precision == "no"  # an explicit setting stays


def test_bf16_autocast_trains_fp32_routers(tmp_path):
    model, _ = routed("llama", router_init="paper", execute_bias=0.0)
    before = {k: v.detach().clone() for k, v in model.router_state_dict().items()}
    blocks = random_ids(8, 16, model.config.vocab_size)
    loop = LoopArgs(max_steps=2, batch_size=2, lr=1e-2, mixed_precision="bf16")
    out = train_routers(
        model, blocks, tmp_path / "bf16", loop, RouterTuningArgs(calibrate_blocks=0), progress=False
    )
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in out["history"])
    after = model.router_state_dict()
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    make_accelerator("no")  # leave the process-wide accelerate state as the other tests expect


def _loss_and_router_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the Gumbel noise of the step
    loss = model(input_ids=ids, labels=ids).loss + 20 * (model.realised_sparsity() - 0.3).abs()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.router_parameters()])


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradient_checkpointing_keeps_router_gradients(arch):
    """Checkpointed routed layers replay the same Gumbel noise; loss and router grads are unchanged."""
    model, _ = routed(arch, router_init="paper", execute_bias=0.0)
    model.mark_only_routers_trainable()
    model.train()
    ids = random_ids(2, 16, model.config.vocab_size)
    loss, grads = _loss_and_router_grads(model, ids)
    set_gradient_checkpointing(model, True)
    assert model.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.routed_layers)
    loss_ckpt, grads_ckpt = _loss_and_router_grads(model, ids)
    set_gradient_checkpointing(model, False)
    assert not model.is_activation_checkpointing
    assert torch.equal(loss, loss_ckpt)
    assert grads.abs().sum() > 0
    torch.testing.assert_close(grads_ckpt, grads, rtol=1e-6, atol=1e-7)


def test_loop_flags_reach_the_cli():
    from skipgpt.cli import build_parser
    from skipgpt.commands.train_router import loop_args_from_args

    argv = ["train-router", "--model", "random:llama", "--output", "x", "--mixed-precision", "bf16"]
    args = build_parser().parse_args([*argv, "--gradient-checkpointing"])
    loop = loop_args_from_args(args)
    assert loop.mixed_precision == "bf16" and loop.gradient_checkpointing is True
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[:-1], "fp8"])


@pytest.mark.parametrize("module", ["skipgpt", "skipgpt.cli"])
def test_python_dash_m_entry_points(module):
    """`accelerate launch -m skipgpt.cli ...` needs `python -m skipgpt.cli` to run the CLI."""
    done = subprocess.run(
        [sys.executable, "-m", module, "train-router", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "--mixed-precision" in done.stdout and "--gradient-checkpointing" in done.stdout


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """2 gloo processes × batch 2 == 1 process × batch 2 × 2 accumulation (bit-identical routers);
    ≈ 1 process × batch 4 (other Gumbel draws); ranks in sync; only rank 0 writes."""
    ddp = _load_script("ddp_check")
    result = ddp.run_check(steps=3, max_blocks=16, batch_size=4, processes=2, workdir=tmp_path)
    assert result["processes"] == 2
    assert result["rank_divergence"] == 0.0
    assert max(result["max_abs_diff_vs_accum"].values()) <= ddp.EXACT_TOL
    assert result["mean_abs_diff_vs_one"]["sparsity"] <= ddp.NOISE_TOL
    assert result["passed"]
    multi = tmp_path / "multi"
    assert sorted(p.name for p in multi.iterdir()) == [
        "checkpoint",
        "routers.safetensors",
        "skipgpt_config.json",
    ]
