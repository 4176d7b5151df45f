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
  (reduced-rank regression), solved in float64 on the CPU with ``torch.linalg``.

Substitute parameters live in ``RoutedDecoderLayer.substitutes`` (float32, like the routers);
``SkipGPTModel.router_state_dict`` names them ``substitutes.layers.{i}.{module}.{param}``, so
they train, save and load with the routers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SkipGPTError

__all__ = [
    "Substitute",
    "ACTIVATIONS",
    "reduced_rank_fit",
    "capture_branches",
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


def reduced_rank_fit(
    inputs: torch.Tensor, outputs: torch.Tensor, rank: int, ridge: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rank-``rank`` linear map that best predicts ``outputs`` (N, d_out) from ``inputs``
    (N, d_in) in least squares: returns (down (r, d_in), up (d_out, r), bias (d_out)).

    Reduced-rank regression: B = OLS coefficient of the centred data (a ``ridge`` relative to
    the mean input variance keeps it well posed), V_r = top-r right singular vectors of the
    fitted values X B; the answer is X (B V_r) V_rᵀ + bias. Computed in float64 on the CPU.
    """
    x = inputs.detach().to("cpu", torch.float64)
    y = outputs.detach().to("cpu", torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise SkipGPTError(f"reduced_rank_fit needs (N, d) inputs and outputs, got {x.shape} and {y.shape}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    gram += ridge * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    coef = torch.linalg.solve(gram, xc.T @ yc)  # (d_in, d_out)
    rank = min(rank, *coef.shape)
    _, _, vh = torch.linalg.svd(xc @ coef, full_matrices=False)
    v = vh[:rank].T  # (d_out, r)
    down = (coef @ v).T  # (r, d_in)
    bias = my - (mx @ coef @ v) @ v.T
    return down.float(), v.float(), bias.float()


@torch.no_grad()
def capture_branches(model, blocks: torch.Tensor, modules: Iterable[str], batch_size: int = 4) -> dict:
    """Run ``model`` (a ``SkipGPTModel``) dense on ``blocks`` (N, T) and return, per (layer,
    module), the normed inputs and branch outputs of every token: ``{(i, m): (x (N·T, d),
    y (N·T, d))}`` on the CPU in float32."""
    modules = tuple(modules)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    outputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []

    def hook(layer, module: str):
        post = "attn_post_norm" if module == "attn" else "mlp_post_norm"

        def fn(mod, args, kwargs, out):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = out[0] if isinstance(out, tuple) else out
            y = layer.norm(post, y)
            key = (layer.layer_idx, module)
            inputs.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).float().cpu())
            outputs.setdefault(key, []).append(y.reshape(-1, y.shape[-1]).float().cpu())

        return fn

    for layer in model.routed_layers:
        for m in modules:
            hooks.append(layer.part(m).register_forward_hook(hook(layer, m), with_kwargs=True))
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
    return {k: (torch.cat(inputs[k]), torch.cat(outputs[k])) for k in inputs}


@torch.no_grad()
def fit_substitutes(model, blocks: torch.Tensor, max_tokens: int = 8192, batch_size: int = 4) -> dict:
    """Closed-form init of every substitute of ``model`` (a ``SkipGPTModel``): the reduced-rank
    least-squares fit of its module's branch output on at most ``max_tokens`` tokens of
    ``blocks`` (N, T), run dense. Returns ``{"tokens", "relative_error": {"{i}.{m}": e}}``, e =
    ||y - fit(x)||² / ||y - mean(y)||² on those tokens (1.0 would be no better than its bias)."""
    layers = [layer for layer in model.routed_layers if len(layer.substitutes)]
    if not layers:
        raise SkipGPTError(
            "the model has no substitutes to fit (set attn_skip_to or mlp_skip_to to 'adapter')"
        )
    n_blocks = max(1, min(blocks.shape[0], -(-max_tokens // blocks.shape[1])))
    modules = sorted({m for layer in layers for m in layer.substitutes})
    captured = capture_branches(model, blocks[:n_blocks], modules, batch_size=batch_size)
    errors = {}
    for layer in layers:
        for m, sub in layer.substitutes.items():
            x, y = captured[(layer.layer_idx, m)]
            down, up, bias = reduced_rank_fit(x, y, sub.rank)
            sub.set_linear(down, up, bias)
            fitted = F.linear(F.linear(x, down), up, bias)
            errors[f"{layer.layer_idx}.{m}"] = float((y - fitted).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    return {"tokens": int(n_blocks * blocks.shape[1]), "relative_error": errors}
