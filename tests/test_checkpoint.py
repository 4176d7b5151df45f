"""Output folders: every kind written by earlier code still loads and gives the same logits.

``tests/fixtures/folders/`` holds one tiny folder of every kind (``tests/fixtures/make_folders.py``
wrote them with the code of skipgpt 0.1.0, before folders had a format version), each with the
logits of a fixed input beside it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from skipgpt import SkipGPTModel, load_model

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
