"""Per-architecture access to a decoder layer's parts: a registry of names, never copied layers.

A decoder layer is read as two residual branches::

    x = x + attn_post_norm(attn(attn_pre_norm(x)))
    x = x + mlp_post_norm(mlp(mlp_pre_norm(x)))

Llama-like layers (Llama, Mistral, Qwen2/3, Phi-3) have only the pre-norms; Gemma 2/3 have
all four norms ("sandwich"); OLMo-2 only post-norms.

A family is registered in one call, ``register_architecture(model_type, adapter,
attention_class, attention_parts)``: the names of its decoder layer's parts (``ADAPTERS``) and
of its attention module's projections and norms, for the skipping kernel (``ATTENTION_PARTS``,
read by ``fast.py``). The test matrix in ``tests/test_arch_matrix.py`` checks every family.

Family notes (transformers 5.x):

* Phi-3 fuses ``qkv_proj`` and ``gate_up_proj``; the routed branches call the modules whole,
  so fusion does not matter here (the fast attention kernel falls back to the reference
  computation for it). Its ``resid_*_dropout`` are identities in eval and at the usual
  ``resid_pdrop=0``; the routed layer does not apply them.
* Gemma 2/3 sliding-window layers need nothing: the model passes each layer its own mask
  (and, for Gemma 3, its own rotary tables) through the layer kwargs, which go to attention.
* Multimodal Gemma 3 (``gemma3``, ``Gemma3ForConditionalGeneration``) keeps its decoder in
  ``model.language_model``; text-only Gemma 3 (``gemma3_text``) in ``model.layers``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import transformers
from torch import nn
from transformers.cache_utils import Cache

from .errors import SkipGPTError

__all__ = [
    "register_architecture",
    "LayerAdapter",
    "AttentionParts",
    "ATTENTION_PARTS",
    "ADAPTERS",
    "LLAMA_LIKE",
    "SANDWICH_NORMS",
    "POST_NORMS",
    "get_adapter",
    "register_adapter",
    "CACHE_ARGUMENTS",
    "cache_argument",
    "missing_cache_error",
    "is_cache",
    "model_cache_argument",
]

# What transformers has called the KV cache a decoder layer receives: ``cache`` since 5.24,
# ``past_key_values`` before, ``past_key_value`` in early 4.x. Resolved once per layer class.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


@dataclass(frozen=True)
class LayerAdapter:
    """Attribute names of one decoder layer's parts (None = that norm does not exist)."""

    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_pre_norm: str | None = "input_layernorm"
    attn_post_norm: str | None = None
    mlp_pre_norm: str | None = "post_attention_layernorm"
    mlp_post_norm: str | None = None
    layers_path: str = "model.layers"

    def part(self, layer: nn.Module, name: str) -> nn.Module | None:
        attr = getattr(self, name)
        return None if attr is None else getattr(layer, attr)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for attr in self.layers_path.split("."):
            obj = getattr(obj, attr)
        return obj

    def branch_modules(self, layer: nn.Module, branch: str) -> list[nn.Module]:
        """The module and its norms of ``branch`` ('attn' or 'mlp'), for parameter counting."""
        names = (branch, f"{branch}_pre_norm", f"{branch}_post_norm")
        return [m for m in (self.part(layer, n) for n in names) if m is not None]


LLAMA_LIKE = LayerAdapter()
SANDWICH_NORMS = LayerAdapter(
    attn_post_norm="post_attention_layernorm",
    mlp_pre_norm="pre_feedforward_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
)

POST_NORMS = LayerAdapter(
    attn_pre_norm=None,
    attn_post_norm="post_attention_layernorm",
    mlp_pre_norm=None,
    mlp_post_norm="post_feedforward_layernorm",
)


@dataclass(frozen=True)
class AttentionParts:
    """Attribute names of an attention module's parts (None = the part does not exist), for an
    attention that follows the Llama recipe: projections -> optional q/k RMSNorm -> rotary on
    the full head dim -> cache update -> scaled dot-product attention (GQA) -> o_proj."""

    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_full_width: bool = False  # q/k norms over all heads at once (OLMo-2), not per head
    qkv_proj: str | None = None  # one fused projection, rows [q | k | v] (Phi-3)


PLAIN_ATTENTION = AttentionParts()
QK_NORM_ATTENTION = AttentionParts(q_norm="q_norm", k_norm="k_norm")

# model_type -> the decoder layer's part names
ADAPTERS: dict[str, LayerAdapter] = {}
# attention class name -> its part names: the classes whose forward the skipping kernel
# reproduces (checked against transformers 5.x); others fall back to the reference attention
ATTENTION_PARTS: dict[str, AttentionParts] = {}


def register_architecture(
    model_type: str,
    adapter: LayerAdapter,
    attention_class: str | None = None,
    attention_parts: AttentionParts = PLAIN_ATTENTION,
) -> None:
    """Support ``model_type``: its decoder layers follow the two-branch shape above with the part
    names of ``adapter``; ``attention_class`` (e.g. ``"LlamaAttention"``), when given, runs on
    the skipping kernel with the projection and norm names of ``attention_parts``."""
    ADAPTERS[model_type] = adapter
    if attention_class is not None:
        ATTENTION_PARTS[attention_class] = attention_parts


register_architecture("llama", LLAMA_LIKE, "LlamaAttention")
register_architecture("mistral", LLAMA_LIKE, "MistralAttention")
register_architecture("qwen2", LLAMA_LIKE, "Qwen2Attention")
register_architecture("qwen3", LLAMA_LIKE, "Qwen3Attention", QK_NORM_ATTENTION)
# fused qkv_proj / gate_up_proj: the routed branches call the modules whole
register_architecture("phi3", LLAMA_LIKE, "Phi3Attention", AttentionParts(qkv_proj="qkv_proj"))
# Gemma 2's logit softcapping falls back to the reference unless the config disables it
register_architecture("gemma2", SANDWICH_NORMS, "Gemma2Attention")
register_architecture("gemma3_text", SANDWICH_NORMS, "Gemma3Attention", QK_NORM_ATTENTION)
register_architecture(
    "gemma3",
    replace(SANDWICH_NORMS, layers_path="model.language_model.layers"),
    "Gemma3Attention",
    QK_NORM_ATTENTION,
)
register_architecture(
    "olmo2",
    POST_NORMS,
    "Olmo2Attention",
    AttentionParts(q_norm="q_norm", k_norm="k_norm", qk_norm_full_width=True),
)


def cache_argument(layer: nn.Module) -> str | None:
    """The name under which ``layer``'s forward receives the KV cache (read from its signature),
    or None if it takes none of ``CACHE_ARGUMENTS``."""
    params = inspect.signature(type(layer).forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in params), None)


def model_cache_argument(model: nn.Module) -> str:
    """The name under which ``model`` (a HF causal LM, or a wrapper whose ``get_base_model()`` or
    ``base_model`` is one) takes a KV cache: ``cache`` since transformers 5.24, ``past_key_values``
    before."""
    while model is not None:
        name = cache_argument(model)
        if name is not None:
            return name
        inner = (
            model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "base_model", None)
        )
        model = None if inner is model else inner
    return "past_key_values"


def missing_cache_error(layer: nn.Module, kwargs: dict) -> SkipGPTError:
    """The one-line error for a decode step whose cache the routed layer cannot find."""
    passed = sorted(k for k, v in kwargs.items() if is_cache(v))
    return SkipGPTError(
        f"transformers {transformers.__version__} passed {type(layer).__name__} a KV cache "
        f"(use_cache={kwargs.get('use_cache')}, cache-like arguments: {passed or 'none'}) but skipgpt "
        f"looked for it under {list(CACHE_ARGUMENTS)}: refusing to skip K/V writes silently; "
        f"register the new name in skipgpt.adapters.CACHE_ARGUMENTS"
    )


def is_cache(value) -> bool:
    return isinstance(value, Cache)


def register_adapter(model_type: str, adapter: LayerAdapter) -> None:
    """Support another ``model_type`` whose decoder layers follow the two-branch shape above
    (its attention on the reference path; ``register_architecture`` registers both)."""
    register_architecture(model_type, adapter)


def get_adapter(model_type: str) -> LayerAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise SkipGPTError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
