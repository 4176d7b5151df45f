"""Static module removal (LLM-Drop): (layer, module) pairs that never run, with KV slots renumbered.

``baselines.llm_drop`` chooses what to remove; this is what a loaded folder needs to apply it
again (``SkipGPTModel.from_pretrained``), so it lives in the core.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .config import MODULES
from .errors import SkipGPTError

__all__ = ["removed_pairs", "apply_removal"]


def removed_pairs(removed: Iterable, num_layers: int) -> frozenset[tuple[int, str]]:
    """``[[layer, 'attn'|'mlp'], ...]`` -> a set of (layer, module); refuses what does not exist."""
    out = set()
    for item in removed:
        try:
            layer, module = int(item[0]), str(item[1])
        except (TypeError, ValueError, IndexError):
            raise SkipGPTError(f"a removed module must be [layer, 'attn'|'mlp'], got {item!r}") from None
        if module not in MODULES or not 0 <= layer < num_layers:
            raise SkipGPTError(
                f"removed module {item!r} does not exist: layers 0..{num_layers - 1}, modules {list(MODULES)}"
            )
        out.add((layer, module))
    return frozenset(out)


def apply_removal(model: nn.Module, removed: Iterable) -> nn.Module:
    """Drop the (layer, module) pairs ``removed`` from ``model`` (a ``SkipGPTModel``, in place) and
    renumber KV slots; returns ``model``.

    The cache builds slot j for ``layer_types[j]`` (sliding or full), and masks and
    ``get_seq_length`` read the first slot of each type. So kept attentions of each type take the
    slots of that type in depth order (for one type: slots 0..m-1), and dropped ones the slots
    left over (used only if something runs them anyway). Refuses to drop every attention of the
    type of slot 0 (nothing would track the sequence length).
    """
    layers = model.routed_layers
    n = len(layers)
    pairs = removed_pairs(removed, n)
    types = list(getattr(model.hf_model.config, "layer_types", None) or ["attention"] * n)
    free = {t: [j for j in range(n) if types[j] == t] for t in dict.fromkeys(types)}
    slots: dict[int, int] = {}
    for i in range(n):
        if (i, "attn") not in pairs:
            slots[i] = free[types[i]].pop(0)
    if 0 not in slots.values():
        raise SkipGPTError(
            f"dropping every {types[0]} attention module leaves no KV cache to track positions; keep one"
        )
    rest = sorted(j for js in free.values() for j in js)
    slots.update(zip((i for i in range(n) if i not in slots), rest, strict=True))
    for i, slot in slots.items():
        attn = layers[i].part("attn")
        if isinstance(getattr(attn, "layer_idx", None), int):
            attn.layer_idx = slot
    model.routing_settings.removed = pairs
    return model
