"""Skip to a cheap substitute, not to nothing.

A routed module whose config says ``skip_to = "adapter"`` (``SkipGPTConfig.attn_skip_to`` /
``mlp_skip_to``) gives its skipping tokens a low-rank ``Substitute`` of itself instead of
nothing (FlexiDepth, HeRo)::

    x + g * module(x) + (1 - g) * substitute(x)      # substitute(x) = up(act(down(norm(x))))

The substitute reads the module's normed input (the branch's pre-norm, as the module does)
and its output is added to the residual stream in place of the branch output. It costs
``2·(2·d·r + d)`` FLOPs per token (``costs.CostModel.substitute``): at the default rank d/16 on
SmolLM2-135M (d = 576, r = 36) 1.6% of an MLP's multiply-adds.

Two initialisations (``SkipGPTConfig.substitute_init``):

* ``zero``: the up projection and bias are zero, so a fresh substitute adds nothing and the
  model equals plain skipping exactly; training (stage 1, beside the routers) grows it;
* ``closed-form`` (``fit_substitutes``): a reduced-rank least-squares fit of the branch output
  from its normed input on calibration tokens (run dense): ordinary least squares of the
  centred data, then the projection of its fitted values on their top-r principal directions
  (reduced-rank regression), solved in float64 on the CPU with ``torch.linalg`` from running
  moments (``RegressionMoments``: d² numbers per module, never the tokens themselves).

Substitute parameters live in ``RoutedDecoderLayer.substitutes`` (float32, like the routers);
``SkipGPTModel.router_state_dict`` names them ``substitutes.layers.{i}.{module}.{param}``, so
they train, save and load with the routers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import SkipGPTError

__all__ = [
    "Substitute",
    "ACTIVATIONS",
    "RegressionMoments",
    "reduced_rank_fit",
    "branch_moments",
    "fit_substitutes",
    "SUBSTITUTE_PREFIX",
    "substitute_ranks",
]

SUBSTITUTE_PREFIX = "substitutes."  # the keys of substitute tensors in routers.safetensors

ACTIVATIONS = {"identity": nn.Identity, "silu": nn.SiLU}


class Substitute(nn.Module):
    """``Linear(d, r, bias=False) -> act -> Linear(r, d)``: a rank-r stand-in for a module.

    Zero-initialised on the output side (``up`` weight and bias): a fresh substitute outputs 0.
    """

    def __init__(self, hidden_size: int, rank: int, activation: str = "identity"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise SkipGPTError(f"substitute activation {activation!r}; accepted: {sorted(ACTIVATIONS)}")
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(rank, hidden_size)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """normed: (..., d) the module's normed input, any dtype -> (..., d) in that dtype."""
        h = normed.to(self.down.weight.dtype)
        return self.up(self.act(self.down(h))).to(normed.dtype)

    @torch.no_grad()
    def set_linear(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor) -> None:
        """Load a fitted map ``y = up @ (down @ x) + bias`` (down (r, d), up (d, r), bias (d))."""
        self.down.weight.copy_(down)
        self.up.weight.copy_(up)
        self.up.bias.copy_(bias)


def substitute_ranks(model) -> dict[str, int]:
    """module -> rank of the substitutes of a ``SkipGPTModel`` (empty: plain skipping)."""
    return {m: sub.rank for layer in model.routed_layers for m, sub in layer.substitutes.items()}


class RegressionMoments:
    """Running sums of a regression of y (N, d_out) on x (N, d_in), in float64 on the CPU: what a
    least-squares fit needs, without keeping the tokens (d² numbers per module, not N·d)."""

    def __init__(self):
        self.n = 0
        self.sx = self.sy = self.xx = self.xy = self.yy = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (..., d_in), y (..., d_out): more tokens."""
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        y = y.detach().reshape(-1, y.shape[-1]).to("cpu", torch.float64)
        if self.sx is None:
            self.sx, self.sy = x.new_zeros(x.shape[1]), y.new_zeros(y.shape[1])
            self.xx, self.xy = x.new_zeros(x.shape[1], x.shape[1]), x.new_zeros(x.shape[1], y.shape[1])
            self.yy = y.new_zeros(())
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y
        self.yy += (y * y).sum()

    def fit(self, rank: int, ridge: float = 1e-4) -> tuple[tuple[torch.Tensor, ...], float]:
        """The rank-``rank`` linear map that best predicts y from x in least squares:
        ((down (r, d_in), up (d_out, r), bias (d_out)), relative error).

        Reduced-rank regression: B = OLS coefficient of the centred data (a ``ridge`` relative
        to the mean input variance keeps it well posed), V_r = top-r eigenvectors of the fitted
        values' covariance Bᵀ Cxx B; the map is x ↦ (x - mean x) B V_r V_rᵀ + mean y. The
        relative error is ||y - fit||² / ||y - mean y||² on the tokens seen (1: no better than
        the mean)."""
        if self.n == 0:
            raise SkipGPTError("no tokens to fit a substitute on")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx - self.n * torch.outer(mx, mx)
        cxy = self.xy - self.n * torch.outer(mx, my)
        eye = torch.eye(cxx.shape[0], dtype=cxx.dtype)
        coef = torch.linalg.solve(cxx + ridge * cxx.diagonal().mean().clamp(min=1e-12) * eye, cxy)
        rank = min(rank, *coef.shape)
        fitted = coef.T @ cxx @ coef  # covariance of the fitted values (d_out, d_out)
        _, vecs = torch.linalg.eigh((fitted + fitted.T) / 2)
        v = vecs[:, -rank:].flip(-1)  # (d_out, r), largest first
        w = coef @ v  # (d_in, r)
        total = float(self.yy - self.n * my @ my)
        explained = float(2 * (cxy @ v * w).sum() - (w.T @ cxx @ w).trace())
        error = (total - explained) / total if total > 0 else 0.0
        return (w.T.float(), v.float(), (my - mx @ w @ v.T).float()), error


def reduced_rank_fit(
    inputs: torch.Tensor, outputs: torch.Tensor, rank: int, ridge: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rank-``rank`` least-squares map from ``inputs`` (N, d_in) to ``outputs`` (N, d_out):
    (down (r, d_in), up (d_out, r), bias (d_out)); see ``RegressionMoments.fit``."""
    if inputs.ndim != 2 or outputs.ndim != 2 or inputs.shape[0] != outputs.shape[0]:
        raise SkipGPTError(
            f"reduced_rank_fit needs (N, d) inputs and outputs, got {tuple(inputs.shape)} and {tuple(outputs.shape)}"
        )
    moments = RegressionMoments()
    moments.add(inputs, outputs)
    return moments.fit(rank, ridge)[0]


@torch.no_grad()
def branch_moments(
    model, blocks: torch.Tensor, pairs: Iterable[tuple[int, str]], batch_size: int = 4
) -> dict[tuple[int, str], RegressionMoments]:
    """Run ``model`` (a ``SkipGPTModel``) dense on ``blocks`` (N, T) and gather, for each (layer,
    module) of ``pairs``, the regression moments of its branch output (after the branch's
    post-norm, if any) on its normed input (what the module reads)."""
    pairs = sorted(set(pairs))
    moments = {k: RegressionMoments() for k in pairs}
    layers = model.routed_layers
    hooks = []

    def hook(layer, module: str):
        post = f"{module}_post_norm"

        def fn(mod, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = out[0] if isinstance(out, tuple) else out
            moments[(layer.layer_idx, module)].add(x, layer.norm(post, y))

        return fn

    for i, m in pairs:
        hooks.append(layers[i].part(m).register_forward_hook(hook(layers[i], m), with_kwargs=True))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with model.dense():
            for s in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return moments


@torch.no_grad()
def fit_substitutes(
    model,
    blocks: torch.Tensor,
    max_tokens: int = 8192,
    batch_size: int = 4,
    pairs: Iterable[tuple[int, str]] | None = None,
) -> dict:
    """Closed-form init of the substitutes of ``model`` (a ``SkipGPTModel``; all, or those of
    ``pairs`` (layer, module)): the reduced-rank least-squares fit of the module's branch output
    on at most ``max_tokens`` tokens of ``blocks`` (N, T), run dense. Returns ``{"tokens",
    "relative_error": {"{i}.{m}": e}}`` (``RegressionMoments.fit``)."""
    have = {(layer.layer_idx, m) for layer in model.routed_layers for m in layer.substitutes}
    if not have:
        raise SkipGPTError(
            "the model has no substitutes to fit (set attn_skip_to or mlp_skip_to to 'adapter')"
        )
    pairs = have if pairs is None else {(int(i), str(m)) for i, m in pairs}
    if not pairs <= have:
        raise SkipGPTError(
            f"no substitute at {sorted(pairs - have)[:3]}; this model has them at {sorted(have)[:3]}..."
        )
    n_blocks = max(1, min(blocks.shape[0], -(-max_tokens // blocks.shape[1])))
    moments = branch_moments(model, blocks[:n_blocks], pairs, batch_size=batch_size)
    layers = model.routed_layers
    errors = {}
    for (i, m), mom in moments.items():
        sub = layers[i].substitutes[m]
        (down, up, bias), errors[f"{i}.{m}"] = mom.fit(sub.rank)
        sub.set_linear(down, up, bias)
    return {"tokens": int(n_blocks * blocks.shape[1]), "relative_error": errors}
