"""Perplexity over non-overlapping fixed-length windows, with the routing statistics it took."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model import SkipGPTModel

__all__ = ["evaluate_perplexity", "DENSE_SPARSITY"]

# params: the skipped modules' parameters (gross); params_net: less the parameters of the
# substitutes that skipping tokens run (= params without substitutes)
DENSE_SPARSITY = {"module": 0.0, "attn": 0.0, "mlp": 0.0, "params": 0.0, "params_net": 0.0}


@torch.no_grad()
def evaluate_perplexity(
    model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "ppl"
) -> dict:
    """blocks: (N, T) token windows. Each window predicts its T-1 next tokens.

    Returns ``{"ppl", "nll", "tokens", "windows", "seq_len", "sparsity"}``; ``sparsity`` is
    what the routers realised on these windows (zeros for a dense model).
    """
    was_training = model.training
    model.eval()
    routed = isinstance(model, SkipGPTModel)
    if routed:
        model.reset_stats()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for i in tqdm(range(0, blocks.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        batch = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        labels = batch[:, 1:]
        nll += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
        )
        tokens += labels.numel()
    model.train(was_training)
    sparsity = dict(DENSE_SPARSITY)
    if routed and model.state.enabled:
        stats = model.sparsity_stats()
        sparsity = {k: stats[k] for k in DENSE_SPARSITY} | {"per_layer": stats["per_layer"]}
    mean = nll / max(tokens, 1)
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": tokens,
        "windows": int(blocks.shape[0]),
        "seq_len": int(blocks.shape[1]),
        "sparsity": sparsity,
    }
