"""benchmarks/train_throughput.py runs and prints its table; bf16 and cached-teacher steps train
only the routers."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import random_ids, routed

from skipgpt.train.loop import LoopArgs, make_accelerator
from skipgpt.train.router_tuning import RouterTuningArgs, train_routers

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_prints_its_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "tt.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--quick", "--threads", "1"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| variant"))
    for column in (
        "teacher fwd s",
        "student fwd s",
        "backward s",
        "optimiser s",
        "tokens/s",
        "vs floor fp32",
        "vs floor, same precision",
    ):
        assert column in header
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "---" not in line}
    plain, fp32, bf16_row = (
        "stage-1 step, fp32, plain KL (the default before #19)",
        "stage-1 step, fp32, LM + KL fused",
        "stage-1 step, bf16 autocast, LM + KL fused (default with native bf16)",
    )
    assert {"floor: frozen fwd+bwd, fp32", "floor: frozen fwd+bwd, bf16", plain, fp32} <= rows.keys()
    cells = [c.strip() for c in rows[bf16_row].split("|")[1:-1]]
    bf16, total = cells[header.split("|")[1:-1].index(" bf16 matmuls ")].split("/")
    assert bf16 == total and int(total) > 0  # every matmul of the autocast step runs in bf16
    for row in (plain, fp32):
        cells = [c.strip() for c in rows[row].split("|")[1:-1]]
        assert cells[header.split("|")[1:-1].index(" bf16 matmuls ")].startswith("0/")
    assert out.read_text().count("| stage-1 step") == 9 and out.with_suffix(".json").is_file()


@pytest.mark.parametrize("teacher_cache", [0, 16])
def test_bf16_step_changes_only_router_parameters(tmp_path, teacher_cache):
    model, _ = routed("llama", router_init="paper", execute_bias=0.0)
    routers = {id(p) for p in model.router_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = random_ids(8, 16, model.config.vocab_size)
    loop = LoopArgs(max_steps=2, batch_size=4, lr=1e-2, mixed_precision="bf16")
    tuning = RouterTuningArgs(distill_weight=1.0, teacher_cache=teacher_cache, calibrate_blocks=0)
    try:
        train_routers(model, blocks, tmp_path / "bf16", loop, tuning, progress=False)
    finally:
        make_accelerator("no")  # the process-wide accelerate state the other tests expect
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    router_names = {n for n, p in model.named_parameters() if id(p) in routers}
    assert changed and changed <= router_names
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    from skipgpt.train import loop

    if torch.accelerator.is_available():
        pytest.skip("the warning is about CPU training")
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    try:
        with pytest.warns(UserWarning, match="without AVX-512 BF16 or AMX"):
            make_accelerator("bf16")
        monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            make_accelerator("bf16")
    finally:
        make_accelerator("no")
