"""Model specs: random models (reproducible, every arch runs), byte tokenizer, errors, SmolLM2 (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from skipgpt.errors import SkipGPTError
from skipgpt.specs import (
    BYTE_VOCAB_SIZE,
    RANDOM_CONFIGS,
    byte_tokenizer,
    describe_spec,
    is_skipgpt_dir,
    load_base_model,
)

ARCHS = sorted(RANDOM_CONFIGS)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_spec_is_reproducible_and_runs(arch):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model, tok = load_base_model(f"random:{arch}")
    assert torch.equal(torch.rand(3), expected_next), "loading must not disturb the global RNG"
    again, _ = load_base_model(f"random:{arch}")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 4, BYTE_VOCAB_SIZE)
    assert not cfg.tie_word_embeddings and not model.training
    assert cfg.pad_token_id == tok.pad_token_id == 0
    enc = tok(["hello world", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, enc.input_ids.shape[1], BYTE_VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_random_dtype_rounds_the_same_weights():
    full, _ = load_base_model("random:llama")
    half, _ = load_base_model("random:llama", dtype=torch.bfloat16)
    w = "model.layers.0.mlp.up_proj.weight"
    assert half.state_dict()[w].dtype == torch.bfloat16
    assert torch.equal(half.state_dict()[w], full.state_dict()[w].to(torch.bfloat16))


def test_byte_tokenizer():
    tok = byte_tokenizer()
    assert len(tok) == BYTE_VOCAB_SIZE == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "héllo, wörld\n\t!"
    ids = tok(text).input_ids
    assert ids == [3 + b for b in text.encode("utf-8")]  # one token a byte, nothing added
    assert tok.decode(ids) == text
    assert byte_tokenizer().get_vocab() == tok.get_vocab()


def test_local_folder_without_pad_gets_eos_as_pad(tmp_path):
    model, tok = load_base_model("random:qwen2")
    model.save_pretrained(tmp_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_base_model(str(tmp_path))
    assert ltok.pad_token == "<eos>" and loaded.config.pad_token_id == ltok.eos_token_id == 2
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert describe_spec(str(tmp_path)) == {
        "spec": str(tmp_path),
        "kind": "local",
        "path": str(tmp_path.resolve()),
    }


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("random:foo", "random:llama"),
        ("random:", "random:qwen3"),
        ("./no/such/model", "random:<"),
        ("missing.gguf", "no such .gguf file"),
        ("a/b/c", "Hub id"),
    ],
)
def test_bad_specs_list_accepted_forms(spec, expect):
    with pytest.raises(SkipGPTError, match="accepted|known") as err:
        load_base_model(spec)
    msg = str(err.value)
    assert expect in msg and "\n" not in msg


def test_folder_without_config_and_wrong_file(tmp_path):
    with pytest.raises(SkipGPTError, match="no config.json.*smollm2-135m"):
        load_base_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SkipGPTError, match="not a .gguf"):
        load_base_model(str(tmp_path / "notes.txt"))


def test_unreachable_hub_is_one_line(monkeypatch):
    import skipgpt.specs as specs

    monkeypatch.setattr(specs, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(SkipGPTError, match="Hub is unreachable") as err:
        load_base_model("skipgpt-tests/no-such-model")
    assert "\n" not in str(err.value)
    assert describe_spec("skipgpt-tests/no-such-model") == {
        "spec": "skipgpt-tests/no-such-model",
        "kind": "hub",
    }


def test_skipgpt_dir_predicate_and_description(tmp_path):
    assert not is_skipgpt_dir(tmp_path) and not is_skipgpt_dir("random:llama")
    (tmp_path / "skipgpt_config.json").write_text(json.dumps({"base_model": "random:llama"}))
    assert is_skipgpt_dir(tmp_path) and is_skipgpt_dir(str(tmp_path))
    assert describe_spec(str(tmp_path))["kind"] == "skipgpt"
    with pytest.raises(SkipGPTError, match="load_model"):
        load_base_model(str(tmp_path))
    assert describe_spec("random:Mistral") == {"spec": "random:Mistral", "kind": "random", "arch": "mistral"}


@pytest.mark.slow
def test_smollm2_loads_and_answers_paris():
    record = describe_spec("smollm2-135m")
    assert record["kind"] == "builtin" and record["path"].endswith(".gguf")
    model, tok = load_base_model("SmolLM2-135M")
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert model.name_or_path == "smollm2-135m"  # a spec that loads again, not the GGUF's folder
    assert tok.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_gguf_model_is_named_by_a_spec_that_loads_again(tmp_path, monkeypatch):
    """transformers names a GGUF model by its folder, which cannot be loaded again; the loader
    names it by the file, so a routed model built over it saves a base that loads."""
    from skipgpt import SkipGPTConfig, get_skipgpt_model, specs

    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")
    calls = []

    def fake_gguf(target, dtype, attn, device_map=None):
        calls.append(target)
        model, tok = load_base_model("random:llama")
        model.config.name_or_path = model.name_or_path = str(tmp_path)  # as transformers names a GGUF
        return model, tok

    monkeypatch.setitem(specs._LOADERS, "gguf", fake_gguf)
    model, _ = load_base_model(str(path))
    assert calls == [path] and model.name_or_path == str(path)
    assert get_skipgpt_model(model, SkipGPTConfig()).base_spec == str(path)
