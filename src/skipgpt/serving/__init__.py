"""Serving routed models with vLLM (``pip install skipgpt[serve]``; see README "Serving with vLLM").

``register`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every process it
starts, before loading a model, and it names ``SkipGPTLlamaForCausalLM`` (``serving.vllm_llama``)
and ``SkipGPTQwen2ForCausalLM`` (``serving.vllm_qwen2``) lazily, so importing this package never
imports vLLM. ``serving.prepare`` turns a skipgpt folder
into a folder vLLM can load (plain HF weights + config naming that architecture + the routers).
"""

from __future__ import annotations

__all__ = ["register", "ARCHITECTURE", "ROUTED_ARCHITECTURES", "DENSE_ARCHITECTURES"]

ARCHITECTURE = "SkipGPTLlamaForCausalLM"
# model_type of the base -> the architecture the prepared folder names
ROUTED_ARCHITECTURES = {"llama": ARCHITECTURE, "qwen2": "SkipGPTQwen2ForCausalLM"}
# model_type -> vLLM's stock class for the same weights (``skipgpt serve --dense``)
DENSE_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_CLASSES = {
    ARCHITECTURE: "skipgpt.serving.vllm_llama:SkipGPTLlamaForCausalLM",
    "SkipGPTQwen2ForCausalLM": "skipgpt.serving.vllm_qwen2:SkipGPTQwen2ForCausalLM",
}


def register() -> None:
    """Register the routed classes with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for name, where in _CLASSES.items():
        if name not in supported:
            ModelRegistry.register_model(name, where)
