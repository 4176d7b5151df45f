"""Random routing at given skip rates: the trivial baseline a trained router must beat.

The policy itself is ``routing.RandomPolicy`` (also what ``eval.speed`` times); this module keeps
the name the commands use.
"""

from __future__ import annotations

from ..routing import RandomPolicy

__all__ = ["random_override", "RandomPolicy"]


def random_override(rates: float | dict[tuple[int, str], float], seed: int = 0) -> RandomPolicy:
    """A policy for ``SkipGPTModel.routing(policy=...)`` (``override=`` takes it too): each
    (token, module) executes with probability ``1 - rate``, where ``rate`` is one number or a
    rate per (layer, module). Decisions come from a private generator, so the same seed gives
    the same routing."""
    return RandomPolicy(rates, seed)
