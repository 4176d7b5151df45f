"""Random routing at given skip rates: the trivial baseline a trained router must beat."""

from __future__ import annotations

import torch

__all__ = ["random_override"]


def random_override(rates: float | dict[tuple[int, str], float], seed: int = 0):
    """An ``override`` for ``SkipGPTModel.routing``: each (token, module) executes with
    probability ``1 - rate``, where ``rate`` is one number or a rate per (layer, module).

    Decisions come from a private generator, so the same seed gives the same routing.
    """
    gen = torch.Generator().manual_seed(seed)

    def override(layer_idx: int, module: str, hidden: torch.Tensor) -> torch.Tensor:
        rate = rates if isinstance(rates, float | int) else rates.get((layer_idx, module), 0.0)
        return (torch.rand(hidden.shape[:2], generator=gen) >= rate).to(hidden.device)

    return override
