"""Shared fixtures: tiny random models of every supported family (fast), SmolLM2 (slow)."""

from __future__ import annotations

import pytest
import torch

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt.specs import RANDOM_CONFIGS, load_base_model

ARCHS = sorted(RANDOM_CONFIGS)


def tiny(arch: str = "llama"):
    """(model, tokenizer) of ``random:<arch>``: a few layers, hidden 64, eval mode."""
    model, tok = load_base_model(f"random:{arch}")
    return model.eval(), tok


def routed(arch: str = "llama", **config):
    model, tok = tiny(arch)
    return get_skipgpt_model(model, SkipGPTConfig(**config), base_spec=f"random:{arch}"), tok


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_llama():
    return tiny("llama")
