"""Per-architecture access to a decoder layer's parts: a registry of names, never copied layers.

A decoder layer is read as two residual branches::

    x = x + attn_post_norm(attn(attn_pre_norm(x)))
    x = x + mlp_post_norm(mlp(mlp_pre_norm(x)))

Llama-like layers (Llama, Mistral, Qwen2/3, Phi-3) have only the pre-norms; Gemma 2/3 have
all four norms ("sandwich"); OLMo-2 only post-norms. A new family is one entry in ``ADAPTERS``
(``model_type`` -> names), checked by the test matrix in ``tests/test_arch_matrix.py``.

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

from dataclasses import dataclass, replace

from torch import nn

from .errors import SkipGPTError

__all__ = [
    "LayerAdapter",
    "ADAPTERS",
    "LLAMA_LIKE",
    "SANDWICH_NORMS",
    "POST_NORMS",
    "get_adapter",
    "register_adapter",
]


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

ADAPTERS: dict[str, LayerAdapter] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "phi3": LLAMA_LIKE,
    "gemma2": SANDWICH_NORMS,
    "gemma3_text": SANDWICH_NORMS,
    "gemma3": replace(SANDWICH_NORMS, layers_path="model.language_model.layers"),
    "olmo2": POST_NORMS,
}


def register_adapter(model_type: str, adapter: LayerAdapter) -> None:
    """Support another ``model_type`` whose decoder layers follow the two-branch shape above."""
    ADAPTERS[model_type] = adapter


def get_adapter(model_type: str) -> LayerAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise SkipGPTError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
