"""Named training recipes: one source of the settings ``skipgpt train-router`` and the Python API use.

A recipe is a set of dataclass instances (router config, stage-1 loss, loop). The field
defaults of those dataclasses *are* the default recipe, so ::

    train_routers(get_skipgpt_model(base, SkipGPTConfig()), blocks, out, LoopArgs())

trains what ``skipgpt train-router --model M --output out`` trains. Other recipes say only
what they change::

    RECIPES["paper"].config(target_sparsity=0.4)   # SkipGPTConfig of the paper's recipe
    RECIPES["paper"].tuning                        # RouterTuningArgs(distill_weight=0, curriculum=0)

``skipgpt train-router --recipe paper`` picks one on the command line (flags given beside it
still win).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import SkipGPTConfig
from .loop import LoopArgs
from .router_tuning import RouterTuningArgs

__all__ = ["Recipe", "RECIPES", "DEFAULT_RECIPE", "LORA_LOOP", "ROUTER_LR", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A stage-1 recipe: the router config, the loss and the loop it trains with."""

    description: str
    router: SkipGPTConfig = field(default_factory=SkipGPTConfig)
    tuning: RouterTuningArgs = field(default_factory=RouterTuningArgs)
    loop: LoopArgs = field(default_factory=LoopArgs)

    def config(self, **changes) -> SkipGPTConfig:
        """The recipe's ``SkipGPTConfig`` with ``changes`` (e.g. ``target_sparsity``)."""
        return dataclasses.replace(self.router, **changes)

    def tuning_args(self, **changes) -> RouterTuningArgs:
        return dataclasses.replace(self.tuning, **changes)

    def loop_args(self, **changes) -> LoopArgs:
        return dataclasses.replace(self.loop, **changes)


DEFAULT_RECIPE = "default"
RECIPES: dict[str, Recipe] = {
    # linear dense-start routers, self-distillation from the dense model, 30% sparsity
    # curriculum: the dataclasses' defaults. Routers start as the base model and learn on small
    # models too. (Linear, no longer the paper's d/4: the frontier found them better at equal measured
    # speed, and a decode step pays for them a fraction of what it pays for d/4 routers.)
    DEFAULT_RECIPE: Recipe(
        "linear dense-start routers, self-distillation from the dense model, 30% sparsity curriculum"
    ),
    # the paper's: d/4 routers, random router init, LM loss only, fixed target (collapses on
    # small models; benchmarks/recipe.py measures both)
    "paper": Recipe(
        "the paper's: d/4 routers, random router init, LM loss only, fixed target",
        router=SkipGPTConfig(router_hidden=None, router_init="paper"),
        tuning=RouterTuningArgs(distill_weight=0.0, curriculum=0.0),
    ),
    # the frontier's best (README "Frontier", runs/rt100-adapter-lin): the default recipe with
    # linear routers (one GEMM per layer at inference) and skipped MLPs running a rank hidden/16
    # substitute fitted in closed form before training, under a parameter budget
    "frontier": Recipe(
        "the default recipe with linear routers, skipped MLPs -> closed-form low-rank substitute, "
        "parameter budget",
        router=SkipGPTConfig(
            router_hidden=0, mlp_skip_to="adapter", substitute_init="closed-form", budget="params"
        ),
    ),
}

# Stage 2 (LoRA) as the paper's code trains it: lr 2e-4, cosine, 10% warm-up; SkipGPT-Joint's
# routers learn at ROUTER_LR beside it.
LORA_LOOP = LoopArgs(lr=2e-4, lr_scheduler="cosine", warmup_ratio=0.1)
ROUTER_LR = 2e-3


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name is refused listing the known ones."""
    from ..errors import SkipGPTError

    if name not in RECIPES:
        raise SkipGPTError(f"unknown recipe {name!r}; accepted: {', '.join(RECIPES)}")
    return RECIPES[name]
