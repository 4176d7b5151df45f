"""Inference execution that really skips work (gather the executing tokens, run, scatter back).

Every function here has a reference twin in ``layer.py`` (module on all tokens, output times
the 0/1 gate) and is tested against it.
"""

from __future__ import annotations

import torch

__all__ = ["fast_attn_residual", "fast_mlp_residual"]


def fast_mlp_residual(layer, hidden_states: torch.Tensor, execute: torch.Tensor) -> torch.Tensor:
    """hidden_states (B, T, d), execute (B, T) bool -> hidden_states + MLP branch on executing tokens."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    idx = execute.reshape(-1).nonzero().squeeze(-1)
    if idx.numel() == 0:
        return hidden_states
    if idx.numel() == flat.shape[0]:
        return hidden_states + layer.mlp_branch(hidden_states)
    out = layer.mlp_branch(flat.index_select(0, idx).unsqueeze(0)).squeeze(0)
    return flat.index_add(0, idx, out.to(flat.dtype)).view_as(hidden_states)


def fast_attn_residual(layer, hidden_states: torch.Tensor, execute: torch.Tensor, **kwargs) -> torch.Tensor:
    """Attention branch for executing tokens only (K/V of every token still computed).

    Placeholder until the real kernel lands: computes the branch for all tokens.
    """
    out = layer.attn_branch(hidden_states, **kwargs)
    return hidden_states + execute.unsqueeze(-1).to(out.dtype) * out
