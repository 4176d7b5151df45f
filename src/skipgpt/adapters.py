"""Per-architecture access to a decoder layer's parts: a registry of names, never copied layers.

A decoder layer is read as two residual branches::

    x = x + attn_post_norm(attn(attn_pre_norm(x)))
    x = x + mlp_post_norm(mlp(mlp_pre_norm(x)))

Llama-like layers have only the pre-norms; Gemma 2/3 have all four norms; OLMo-2 only
post-norms. A new family is one entry in ``ADAPTERS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import SkipGPTError

__all__ = ["LayerAdapter", "ADAPTERS", "get_adapter", "register_adapter"]


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

ADAPTERS: dict[str, LayerAdapter] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
}


def register_adapter(model_type: str, adapter: LayerAdapter) -> None:
    ADAPTERS[model_type] = adapter


def get_adapter(model_type: str) -> LayerAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise SkipGPTError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
