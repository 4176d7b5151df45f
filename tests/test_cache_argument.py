"""The KV cache reaches the fast path whatever transformers calls it, and never silently goes missing.

transformers 5.24 renamed the decoder layers' cache argument from ``past_key_values`` to
``cache``; skipgpt reads the name from the layer's forward signature when it wraps the model.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import random_ids, routed
from torch import nn
from transformers import DynamicCache

from skipgpt import adapters
from skipgpt.errors import SkipGPTError


class _NewStyle(nn.Module):
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        return hidden_states


class _OldStyle(nn.Module):
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        return hidden_states


class _Unknown(nn.Module):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return hidden_states


def test_cache_argument_read_from_the_signature():
    assert adapters.cache_argument(_NewStyle()) == "cache"
    assert adapters.cache_argument(_OldStyle()) == "past_key_values"
    assert adapters.cache_argument(_Unknown()) is None


def test_routed_layers_resolve_the_installed_name_once():
    model, _ = routed("llama")
    names = {layer.cache_arg for layer in model.routed_layers}
    expected = adapters.cache_argument(model.routed_layers[0].base_layer)
    assert names == {expected} and expected in adapters.CACHE_ARGUMENTS
    assert adapters.model_cache_argument(model) in adapters.CACHE_ARGUMENTS


def test_kv_cache_found_under_either_name():
    model, _ = routed("llama")
    layer = model.routed_layers[0]
    cache = DynamicCache()
    for name in ("cache", "past_key_values"):
        layer.cache_arg = name
        assert layer.kv_cache({name: cache, "use_cache": True}) is cache
    assert layer.kv_cache({"use_cache": False}) is None  # training / no cache: nothing to find


def test_cache_under_another_name_is_refused_in_one_line():
    model, _ = routed("llama")
    layer = model.routed_layers[0]
    layer.cache_arg = "past_key_values"
    with pytest.raises(SkipGPTError) as err:
        layer.kv_cache({"cache": DynamicCache(), "use_cache": True})
    msg = str(err.value)
    assert "\n" not in msg and transformers.__version__ in msg
    assert all(name in msg for name in adapters.CACHE_ARGUMENTS) and "'cache'" in msg


def test_unknown_cache_name_fails_loudly_in_a_decode_step(monkeypatch):
    """Simulate a future rename: the wrap finds none of the known names in the layer's
    signature; a decode step through the fast path must raise, not drop the K/V writes."""
    monkeypatch.setattr(adapters, "CACHE_ARGUMENTS", ("renamed_cache",))
    model, _ = routed("llama")
    assert all(layer.cache_arg is None for layer in model.routed_layers)
    ids = random_ids(2, 6, model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)

    def half(layer_idx, module, hidden):  # some tokens skip: the fast kernel writes K/V itself
        return torch.rand(hidden.shape[:2], generator=gen) < 0.5

    with torch.no_grad(), model.routing(override=half), pytest.raises(SkipGPTError, match="renamed_cache"):
        model(input_ids=ids, use_cache=True)
    with torch.no_grad(), model.routing(override=half):  # no cache in use: runs
        model(input_ids=ids, use_cache=False)
