"""Output folders: every kind written by earlier code still loads and gives the same logits.

``tests/fixtures/folders/`` holds one tiny folder of every kind (``tests/fixtures/make_folders.py``
wrote them with the code of skipgpt 0.1.0, before folders had a format version), each with the
logits of a fixed input beside it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import routed
from safetensors.torch import load_file

from skipgpt import SkipGPTError, SkipGPTModel, checkpoint, load_model

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_folders", FIXTURES / "make_folders.py")
make_folders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_folders)

FOLDER_KINDS = sorted(make_folders.KINDS)
ROUTED = {"routed", "routed_lora", "joint", "llm_drop", "llm_drop_lora", "mod", "exported", "calibrated"}


@pytest.fixture
def folders(tmp_path) -> Path:
    """A copy of the fixture folders, so that nothing a test or loader does touches the committed ones."""
    copy = tmp_path / "folders"
    shutil.copytree(make_folders.FOLDERS, copy)
    return copy


def test_every_kind_the_writers_know_has_a_fixture():
    assert sorted(p.name for p in make_folders.FOLDERS.iterdir() if p.is_dir()) == FOLDER_KINDS


@pytest.mark.parametrize("name", FOLDER_KINDS)
def test_old_folder_loads_with_identical_logits(folders, name):
    model, _ = load_model(str(folders / name))
    assert isinstance(model, SkipGPTModel) == (name in ROUTED)
    with torch.no_grad():
        logits = model(input_ids=make_folders.fixed_input()).logits.float()
    expected = load_file(str(folders / name / make_folders.LOGITS_NAME))["logits"]
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)


# -- the record ------------------------------------------------------------------------------------
KIND_OF = {
    "routed": "routed",
    "routed_lora": "routed-lora",
    "dense_lora": "dense-lora",
    "joint": "routed-lora",
    "llm_drop": "llm-drop",
    "llm_drop_lora": "llm-drop",
    "shortgpt": "shortgpt",
    "mod": "mod",
    "exported": "routed-lora",
    "calibrated": "routed",
}


def test_every_kind_is_recognised(folders):
    records = {name: checkpoint.read(folders / name) for name in FOLDER_KINDS}
    assert {name: r.kind for name, r in records.items()} == KIND_OF
    assert set(KIND_OF.values()) == set(checkpoint.FOLDER_KINDS)
    assert [name for name, r in records.items() if r.exported] == ["exported"]
    assert [name for name, r in records.items() if r.adapter] == [
        "dense_lora",
        "exported",
        "joint",
        "llm_drop_lora",
        "routed_lora",
    ]
    assert records["exported"].base_spec == str((folders / "exported" / "hf").resolve())
    assert records["routed"].base_spec == "random:llama"
    assert records["shortgpt"].base_spec == str(folders / "shortgpt")
    assert records["dense_lora"].router_config is None and records["routed"].router_config.router_hidden == 0
    assert all(r.format_version == 0 and r.substitutes is None for r in records.values())  # 0.1.0's


def test_old_llm_drop_folders_are_migrated(folders):
    """0.1.0 kept LLM-Drop's removed modules in the metadata only; the record has them on top."""
    raw = json.loads((folders / "llm_drop" / checkpoint.CONFIG_NAME).read_text())
    assert "format_version" not in raw and "removed_modules" not in raw
    record = checkpoint.read(folders / "llm_drop")
    assert [list(p) for p in record.removed_modules] == sorted(raw["metadata"]["removed_modules"])
    assert checkpoint.read(folders / "llm_drop_lora").removed_modules == record.removed_modules
    assert checkpoint.read(folders / "routed").removed_modules == ()


@pytest.mark.parametrize("name", FOLDER_KINDS)
def test_record_round_trip(folders, tmp_path, name):
    """write(read(old folder)) is read back equal, in the current format, and still loads the same."""
    record = checkpoint.read(folders / name)
    if record.kind == "shortgpt":
        with pytest.raises(SkipGPTError, match="plain HF model"):
            checkpoint.write(tmp_path, record)
        return
    checkpoint.write(folders / name, record)
    raw = json.loads((folders / name / checkpoint.CONFIG_NAME).read_text())
    assert raw["format_version"] == checkpoint.FORMAT_VERSION
    again = checkpoint.read(folders / name)
    assert again.format_version == checkpoint.FORMAT_VERSION
    assert again == record.replace(skipgpt_version=again.skipgpt_version, format_version=again.format_version)
    test_old_folder_loads_with_identical_logits(folders, name)


def test_save_pretrained_writes_the_current_format(tmp_path):
    model, _ = routed("llama")
    model.state.removed = frozenset({(2, "mlp"), (1, "attn")})
    model.save_pretrained(tmp_path / "m", metadata={"note": 1})
    record = checkpoint.read(tmp_path / "m")
    assert record.kind == "llm-drop" and record.removed_modules == ((1, "attn"), (2, "mlp"))
    assert record.router_config == model.skipgpt_config and record.metadata == {"note": 1}
    assert (record.base_model, record.model_type, record.num_layers) == ("random:llama", "llama", 4)


def _refused(folder, match: str) -> str:
    with pytest.raises(SkipGPTError, match=match) as exc:
        checkpoint.read(folder)
    assert "\n" not in str(exc.value)
    with pytest.raises(SkipGPTError, match=match):
        load_model(str(folder))
    return str(exc.value)


def test_newer_format_version_is_refused_in_one_line(folders):
    path = folders / "routed" / checkpoint.CONFIG_NAME
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(raw | {"format_version": checkpoint.FORMAT_VERSION + 1}))
    _refused(folders / "routed", "newer than this skipgpt")
    path.write_text(json.dumps(raw | {"format_version": "one"}))
    _refused(folders / "routed", "'format_version' must be an integer")


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"router_config": null}', "names no base model"),
        (
            '{"format_version": 1, "base_model": "random:llama", "router_config": null, "removed_modules": [[0, "ffn"]]}',
            "removed module",
        ),
    ],
)
def test_corrupt_config_is_refused_in_one_line(folders, content, match):
    (folders / "routed" / checkpoint.CONFIG_NAME).write_text(content)
    _refused(folders / "routed", match)


def test_missing_config_is_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SkipGPTError, match="not found: not a skipgpt output folder") as exc:
        checkpoint.read(tmp_path / "empty")
    assert "\n" not in str(exc.value)
    assert not checkpoint.is_skipgpt_dir(tmp_path / "empty") and not checkpoint.is_output_dir(
        tmp_path / "empty"
    )


def test_is_skipgpt_dir_has_one_owner():
    from skipgpt import loading, specs

    assert specs.is_skipgpt_dir is loading.is_skipgpt_dir is checkpoint.is_skipgpt_dir


def test_todays_writers_write_the_same_kinds_in_the_current_format(tmp_path):
    """The fixture script run with today's code: same kinds, format version 1, same logits."""
    assert make_folders.main([str(tmp_path / "new")]) == 0
    for name in FOLDER_KINDS:
        record = checkpoint.read(tmp_path / "new" / name)
        assert record.kind == KIND_OF[name], name
        assert record.format_version == (0 if name == "shortgpt" else checkpoint.FORMAT_VERSION), name
        new = load_file(str(tmp_path / "new" / name / make_folders.LOGITS_NAME))["logits"]
        old = load_file(str(make_folders.FOLDERS / name / make_folders.LOGITS_NAME))["logits"]
        torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6, msg=name)
    assert checkpoint.read(tmp_path / "new" / "llm_drop").removed_modules == (
        checkpoint.read(make_folders.FOLDERS / "llm_drop").removed_modules
    )
