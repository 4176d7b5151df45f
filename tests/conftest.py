"""Shared fixtures: tiny random models of every supported family (fast), SmolLM2 (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt.specs import RANDOM_CONFIGS, load_base_model

ARCHS = sorted(RANDOM_CONFIGS)

# Tiny models: one thread is fastest, and immune to a busy machine (two threads that wait on a
# busy core make small matmuls ~50x slower). Slow tests on the real model ask for more threads.
torch.set_num_threads(1)
# --mixed-precision auto picks bf16 on a CPU with AVX-512 BF16: the suite trains in fp32 on every
# machine (tests that want auto or bf16 set it themselves).
os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "no")


def tiny(arch: str = "llama"):
    """(model, tokenizer) of ``random:<arch>``: a few layers, hidden 64, eval mode."""
    model, tok = load_base_model(f"random:{arch}")
    return model.eval(), tok


def routed(arch: str = "llama", **config):
    model, tok = tiny(arch)
    return get_skipgpt_model(model, SkipGPTConfig(**config), base_spec=f"random:{arch}"), tok


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A small text file (a few thousand bytes of repeated words) to train CLI runs on."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(" ".join(f"word{i % 53} and some more text, number {i}." for i in range(200)))
    return path


def interrupted_and_resumed(blocks, out, loop, tuning=None, stop_after: int = 3, **config):
    """Stage-1 history of a run on ``routed("llama", **config)`` interrupted after step
    ``stop_after`` (an exception from ``on_step``, as a kill between checkpoints) and resumed in
    ``out`` by a fresh model: what an uninterrupted run must equal from ``stop_after`` on."""
    from skipgpt.train.router_tuning import train_routers

    class Stop(Exception):
        pass

    def stop(step, metrics):
        if step == stop_after:
            raise Stop

    extra = {} if tuning is None else {"args": tuning}
    part, _ = routed("llama", **config)
    with pytest.raises(Stop):
        train_routers(part, blocks, out, loop, progress=False, on_step=stop, **extra)
    resumed, _ = routed("llama", **config)
    return train_routers(resumed, blocks, out, loop, resume=True, progress=False, **extra)["history"]


def cache_kwargs(model, cache) -> dict:
    """The KV cache as ``model`` takes it: ``cache=`` since transformers 5.24 (``past_key_values=``
    is deprecated there and goes in 5.40), ``past_key_values=`` before."""
    from skipgpt.adapters import model_cache_argument

    return {model_cache_argument(model): cache, "use_cache": True}


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tiny_llama():
    return tiny("llama")


@pytest.fixture(autouse=True)
def _threads_for_slow_tests(request):
    """Tests marked ``slow`` run the real SmolLM2: give them every core."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    import os

    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)
