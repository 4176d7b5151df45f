"""What the static baselines share: residual-stream similarities, parameter counts, budget matching.

Similarities. For every decoder layer ``l`` three hidden states of the residual stream are
captured with forward hooks (the model is not modified):

    x_l  (block input)  --attention branch-->  h_l  (post-attention)  --MLP branch-->  x_{l+1}

and the mean cosine similarity over real (non-padding) tokens of each pair is returned:
``block`` = cos(x_l, x_{l+1}) (ShortGPT's Block Influence is ``1 - block``), ``attn`` =
cos(x_l, h_l) and ``mlp`` = cos(h_l, x_{l+1}) (LLM-Drop's module importance is ``1 - cos``).
A branch whose output is zero leaves the stream unchanged, so its similarity is exactly 1.

Budget. Everything is measured in *parameter sparsity* (DESIGN.md): parameters of removed
modules (a module counts its norms) / attention+MLP parameters of all decoder layers, the same
weights as ``SkipGPTModel.branch_params``. A static method removes whole units (a layer, or an
attention/MLP module), so a budget is met up to one unit: ``select_by_budget`` removes the
lowest-scored units in order and stops at the prefix whose parameter share is *nearest* the
target (ties: the smaller prefix, i.e. the baseline is never given more sparsity than asked),
or, with ``rounding='down'``/``'up'``, the largest prefix not above / smallest not below it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adapters import get_adapter
from ..checkpoint import is_output_dir
from ..config import MODULES
from ..errors import SkipGPTError

__all__ = [
    "ROUNDINGS",
    "residual_similarities",
    "branch_param_counts",
    "select_by_budget",
    "unit_params",
    "check_budget",
    "baseline_output",
    "check_baseline_output",
    "describe_removed",
]

ROUNDINGS = ("nearest", "down", "up")


def _plain(model: nn.Module) -> nn.Module:
    """The HF model under a ``SkipGPTModel`` (refused: scores are for the unrouted model)."""
    from ..model import SkipGPTModel

    if isinstance(model, SkipGPTModel):
        raise SkipGPTError("baselines score the base model; give a base model spec, not a skipgpt folder")
    return model


def _first_tensor(x):
    return x[0] if isinstance(x, tuple | list) else x


@torch.no_grad()
def residual_similarities(
    model: nn.Module,
    blocks: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Mean cosine similarities of the residual stream, per layer, over real tokens.

    blocks: (N, T) token ids; attention_mask: (N, T) 1 = real token (None = all real).
    Returns ``{"block": [L], "attn": [L], "mlp": [L], "tokens": n}`` (floats in [-1, 1]).
    """
    model = _plain(model)
    adapter = get_adapter(model.config.model_type)
    layers = adapter.layers(model)
    L = len(layers)
    sums = {k: torch.zeros(L, dtype=torch.float64) for k in ("block", "attn", "mlp")}
    seen: dict[tuple[int, str], torch.Tensor] = {}
    valid: list[torch.Tensor | None] = [None]
    count = [0.0]

    def cos_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, T)
        m = valid[0]
        return (c if m is None else c * m).sum().double()

    def block_in(i):
        def hook(module, args, kwargs):
            seen[(i, "x")] = args[0] if args else kwargs["hidden_states"]

        return hook

    def block_out(i):
        def hook(module, args, kwargs, output):
            x, h, out = seen.pop((i, "x")), seen.pop((i, "h")), _first_tensor(output)
            sums["block"][i] += cos_sum(x, out)
            sums["attn"][i] += cos_sum(x, h)
            sums["mlp"][i] += cos_sum(h, out)

        return hook

    def post_attention(i):
        # the MLP branch's first module reads the post-attention residual h_l
        def hook(module, args, kwargs):
            h = args[0] if args else next(iter(kwargs.values()))
            seen[(i, "h")] = h

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            entry = adapter.part(layer, "mlp_pre_norm") or adapter.part(layer, "mlp")
            handles.append(layer.register_forward_pre_hook(block_in(i), with_kwargs=True))
            handles.append(entry.register_forward_pre_hook(post_attention(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(block_out(i), with_kwargs=True))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for s in tqdm(
            range(0, blocks.shape[0], batch_size), desc="scoring", disable=not progress, leave=False
        ):
            ids = blocks[s : s + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[s : s + batch_size].to(device)
            valid[0] = None if mask is None else mask.float()
            count[0] += float(ids.numel() if mask is None else mask.sum())
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    n = max(count[0], 1.0)
    out = {k: (v / n).tolist() for k, v in sums.items()}
    out["tokens"] = int(count[0])
    return out


def branch_param_counts(model: nn.Module) -> dict[tuple[int, str], int]:
    """(layer, 'attn'|'mlp') -> parameters of the module and its norms (as ``SkipGPTModel.branch_params``)."""
    from ..model import SkipGPTModel

    if isinstance(model, SkipGPTModel):
        return dict(model.branch_params)
    adapter = get_adapter(model.config.model_type)
    return {
        (i, b): sum(p.numel() for m in adapter.branch_modules(layer, b) for p in m.parameters())
        for i, layer in enumerate(adapter.layers(model))
        for b in MODULES
    }


def select_by_budget(
    scores: dict[Hashable, float],
    params: dict[Hashable, int],
    sparsity: float,
    total: int,
    rounding: str = "nearest",
    unit: str = "unit",
) -> tuple[list, float]:
    """Remove the lowest-scored units until their parameter share meets ``sparsity``.

    ``scores``/``params``: unit -> importance / parameter count; ``total``: the denominator
    (attention+MLP parameters of all layers). Units are taken in ascending score (ties: the
    later unit first, as deeper layers are the usual pruning candidates). Returns
    ``(removed units in order, realised share)``. Refuses a budget that rounds to removing
    nothing or every unit, naming the range that works.
    """
    if rounding not in ROUNDINGS:
        raise SkipGPTError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    order = sorted(scores, key=lambda u: (scores[u], -_position(u)))
    cum = [0.0]
    for u in order:
        cum.append(cum[-1] + params[u] / total)
    if rounding == "nearest":
        # rounded so that float summation noise cannot break a true tie (e.g. 7.5 equal layers)
        k = min(range(len(cum)), key=lambda j: (round(abs(cum[j] - sparsity), 9), j))
    elif rounding == "down":
        k = max(j for j in range(len(cum)) if cum[j] <= sparsity + 1e-12)
    else:
        k = next((j for j in range(len(cum)) if cum[j] >= sparsity - 1e-12), len(cum) - 1)
    n = len(order)
    if k == 0:
        raise SkipGPTError(
            f"sparsity {sparsity:g} rounds to removing no {unit} (the first {unit} to go holds "
            f"{cum[1]:.4f} of the parameters); give a larger sparsity"
        )
    if k == n:
        raise SkipGPTError(
            f"sparsity {sparsity:g} would remove all {n} {unit}s, leaving nothing to run; give a "
            f"sparsity below {cum[n - 1]:.4f} (removing {n - 1} of {n})"
        )
    return order[:k], cum[k]


def unit_params(model: nn.Module, units: str | tuple[str, ...]) -> tuple[dict, int]:
    """Removable units and their parameters: ``units='layers'`` (layer index -> attn+MLP), or a
    tuple of module kinds ((layer, kind) -> parameters). Also returns the budget denominator."""
    params = branch_param_counts(model)
    total = sum(params.values())
    if units == "layers":
        n = len(params) // len(MODULES)
        return {i: sum(params[(i, m)] for m in MODULES) for i in range(n)}, total
    return {k: v for k, v in params.items() if k[1] in units}, total


def check_budget(model: nn.Module, sparsity: float, rounding: str = "nearest", units="layers") -> None:
    """Refuse, before any scoring, a budget no choice of units can meet (all or none removed).

    Exact for equal-sized units (ShortGPT's layers); for mixed sizes it catches the sure cases."""
    params, total = unit_params(model, units)
    name = "layer" if units == "layers" else "module"
    select_by_budget(dict.fromkeys(params, 0.0), params, sparsity, total, rounding, unit=name)


def _position(unit) -> float:
    """Sort key of a unit's depth: a layer index, or (layer, module) with attention before MLP."""
    if isinstance(unit, tuple):
        return unit[0] + (0.5 if unit[1] == "mlp" else 0.0)
    return float(unit)


@contextlib.contextmanager
def baseline_output(path: str | Path, overwrite: bool = False):
    """Yield a temp folder to fill; on success it becomes ``path`` (atomically, for a new path).

    An existing non-empty ``path`` is refused unless ``overwrite`` and it is a skipgpt or baseline
    folder (``skipgpt_config.json`` / ``shortgpt.json``); it is then swapped out only after the new
    folder is complete, so a failure never leaves a half-written model.
    """
    path = Path(path)
    check_baseline_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield stage
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(stage, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def check_baseline_output(path: str | Path, overwrite: bool = False) -> None:
    """Refuse an output folder we may not write (call before any slow work)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise SkipGPTError(f"output {path} exists and is a file; give a new folder")
    if not any(path.iterdir()):
        return
    if not is_output_dir(path):
        raise SkipGPTError(
            f"output folder {path} exists and is not a skipgpt/baseline folder; give a new folder"
        )
    if not overwrite:
        raise SkipGPTError(
            f"output folder {path} already holds a model; give a new folder or pass --overwrite"
        )


def describe_removed(removed: Sequence) -> str:
    return ", ".join(str(u) if not isinstance(u, tuple) else f"{u[0]}.{u[1]}" for u in removed)
