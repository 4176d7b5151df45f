"""Data specs: built-ins (calib / wiki-heldout disjoint, ptb), local files, errors, block packing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from skipgpt.data import (
    BUILTIN_DATASETS,
    HELDOUT_MIN_CHARS,
    load_blocks,
    load_texts,
    pack_blocks,
    wiki_articles,
)
from skipgpt.errors import SkipGPTError
from skipgpt.specs import byte_tokenizer

B = 3  # byte b has id B + b in the byte tokenizer; pad, bos, eos = 0, 1, 2
BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _ids(text: str) -> list[int]:
    return [B + b for b in text.encode("utf-8")]


# --- built-ins -------------------------------------------------------------------------------


def test_wiki_articles_have_no_tags():
    articles = wiki_articles()
    assert len(articles) > 1000
    assert not any("<doc " in a or "</doc>" in a for a in articles)


def test_calib_and_wiki_heldout_are_disjoint():
    calib, held = load_texts("calib"), load_texts("wiki-heldout")
    assert sum(map(len, held)) >= HELDOUT_MIN_CHARS
    assert not set(held) & set(calib)
    calib_titles = {doc.splitlines()[0] for doc in calib}
    assert not {a.splitlines()[0] for a in held} & calib_titles
    calib_lines = {line.strip() for doc in calib for line in doc.splitlines() if len(line.strip()) >= 40}
    leaked = [line for a in held for line in a.splitlines() if line.strip() in calib_lines]
    assert not leaked, leaked[:3]
    # deterministic, and calib mixes every calibration file
    assert load_texts("wiki-heldout") == held and load_texts("calib") == calib
    joined = "\n".join(calib)
    for snippet in ("One day, a little girl named Lily found a needle", "MIT License", "MacRumors"):
        assert snippet in joined
    assert "<|endoftext|>" not in joined and "<doc " not in joined


def test_builtins_take_no_or_known_splits():
    assert set(BUILTIN_DATASETS) >= {"calib", "wiki-heldout", "ptb"}
    with pytest.raises(SkipGPTError, match="no splits"):
        load_texts("calib:test")
    with pytest.raises(SkipGPTError, match="ptb:valid"):
        load_texts("ptb:dev")


def test_ptb_splits():
    (test,) = load_texts("ptb")
    assert len(test.split()) == 78669 and len(test.splitlines()) == 3761
    assert test.startswith("no it was n't black monday\nbut while")
    assert "<unk>" in test and " N " in test
    (valid,) = load_texts("ptb:valid")
    assert len(valid.split()) == 70390
    assert load_texts("ptb", split="validation") == [valid]


# --- local files -----------------------------------------------------------------------------


def test_local_txt_jsonl_parquet_and_folder(tmp_path, tok):
    (tmp_path / "b.txt").write_text("whole file\nis one text\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "second"}) + "\n",
        encoding="utf-8",
    )
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.csv").write_text("text\nnope\n")

    assert load_texts(str(tmp_path / "b.txt")) == ["whole file\nis one text\n"]
    assert load_texts(tmp_path / "a.jsonl") == ["first", "second"]
    assert load_texts(str(tmp_path / "c.parquet")) == ["p1", "p2"]
    assert load_texts(str(tmp_path)) == ["first", "second", "whole file\nis one text\n", "p1", "p2"]

    blocks = load_blocks(str(tmp_path / "a.jsonl"), tok, seq_len=4)  # 15 tokens -> 3 blocks
    assert blocks.tolist() == [[BOS, *_ids("fir")], [*_ids("st"), EOS, BOS], _ids("seco")]
    assert (
        load_blocks(str(tmp_path / "a.jsonl"), tok, seq_len=4, max_blocks=1).tolist() == blocks[:1].tolist()
    )


def test_local_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x", "id": 3}) + "\n")
    with pytest.raises(SkipGPTError, match=r"line 2 has no 'text' field \(found: content, id\)"):
        load_texts(str(bad))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(SkipGPTError, match=r"no 'text' column \(found: body\)"):
        load_texts(str(tmp_path / "bad.parquet"))
    with pytest.raises(SkipGPTError, match="no such data file"):
        load_texts(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SkipGPTError, match="holds no"):
        load_texts(str(empty))


def test_unknown_dataset_offline_lists_accepted(monkeypatch):
    import skipgpt.data as data

    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(data, "hub_offline", lambda: False)
    with pytest.raises(SkipGPTError) as err:
        load_texts("no-such-dataset-anywhere")
    msg = str(err.value)
    assert "unreachable" in msg and "calib" in msg and "wiki-heldout" in msg and ".jsonl" in msg
    assert "\n" not in msg


# --- packing ---------------------------------------------------------------------------------


def test_pack_blocks_shape_and_values(tok):
    stream = [BOS, *_ids("ab"), EOS, BOS, *_ids("cde"), EOS]  # 9 tokens
    blocks = pack_blocks(["ab", "cde"], tok, seq_len=3)
    assert blocks.dtype == torch.long and blocks.shape == (3, 3)
    assert blocks.flatten().tolist() == stream
    assert pack_blocks(["ab", "cde"], tok, seq_len=3, max_blocks=2).tolist() == [stream[:3], stream[3:6]]
    assert pack_blocks(["ab", "cde"], tok, seq_len=4).flatten().tolist() == stream[:8]  # remainder dropped
    no_bos = pack_blocks(["ab", "cde"], tok, seq_len=3, add_bos=False)
    assert no_bos.flatten().tolist() == [*_ids("ab"), EOS, *_ids("cde"), EOS][:6]


def test_pack_blocks_many_texts_match_one_by_one(tok):
    texts = [f"text number {i} " * (i % 5 + 1) for i in range(300)]  # > one tokenizer batch, with a bar
    expected = [t for text in texts for t in [BOS, *_ids(text), EOS]]
    blocks = pack_blocks(texts, tok, seq_len=64)
    assert blocks.flatten().tolist() == expected[: blocks.numel()]
    assert blocks.shape == (len(expected) // 64, 64)


def test_too_short_dataset_errors(tmp_path, tok):
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(SkipGPTError, match=r"has 6 tokens, fewer than one block of seq_len=64.*--seq-len"):
        load_blocks(str(tmp_path / "short.txt"), tok, seq_len=64)
    with pytest.raises(SkipGPTError, match="seq_len"):
        pack_blocks(["abc"], tok, seq_len=0)


@pytest.mark.slow
def test_builtin_token_counts_with_smollm2():
    from transformers import AutoTokenizer

    from skipgpt.assets import smollm2_gguf

    gguf = smollm2_gguf()
    smol = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    held = load_blocks("wiki-heldout", smol, seq_len=1024)
    assert held.shape[0] * 1024 >= 40_000
    ptb = load_blocks("ptb", smol, seq_len=1024)
    assert ptb.shape[0] >= 90
    calib = load_blocks("calib", smol, seq_len=1024, max_blocks=16)
    assert calib.shape == (16, 1024) and int(calib.max()) < len(smol)
