"""`SkipGPTConfig`: what a routed model is, validated, and (de)serialised as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import SkipGPTError

__all__ = [
    "SkipGPTConfig",
    "CONFIG_NAME",
    "MODULES",
    "ROUTER_INITS",
    "BUDGETS",
    "MLP_ROUTER_INPUTS",
    "RENAMED_KEYS",
    "ROUTER_NORMS",
    "SKIP_TARGETS",
    "SUBSTITUTE_INITS",
    "SUBSTITUTE_ACTIVATIONS",
]

CONFIG_NAME = "skipgpt_config.json"
MODULES = ("attn", "mlp")
ROUTER_INITS = ("dense", "paper")
BUDGETS = ("modules", "params")
MLP_ROUTER_INPUTS = ("block_input", "post_attention")
ROUTER_NORMS = ("none", "rms")  # what a router does to the hidden state before its first layer
SKIP_TARGETS = ("identity", "adapter")  # what a skipped (token, module) runs instead
SUBSTITUTE_INITS = ("zero", "closed-form")
SUBSTITUTE_ACTIVATIONS = ("identity", "silu")
# keys of a saved router config that were renamed: old -> new (``from_dict`` migrates them)
RENAMED_KEYS = {"alpha": "sparsity_weight"}


def _probability(name: str, value: Any, *, open_interval: bool) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SkipGPTError(f"{name} must be a number, got {value!r}") from None
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not ok or math.isnan(value):
        accepted = "strictly between 0 and 1" if open_interval else "in [0, 1]"
        raise SkipGPTError(f"{name} must be {accepted}, got {value!r}")
    return value


@dataclass
class SkipGPTConfig:
    """Configuration of the routers put on every decoder layer.

    The router of each (layer, module) reads a token's hidden state and decides *execute* or
    *skip*. Training samples decisions with straight-through Gumbel-softmax; inference executes
    a module iff p(execute) >= ``threshold``.

    Field metadata drives the command line (``skipgpt.commands.dataclass_args``): ``help``,
    ``choices`` (the constants above), ``flag``/``aliases`` where the flag is not the field's
    name, ``type`` (a named argparse type of ``commands.common.ARG_TYPES``), ``cli: False`` for
    fields no command exposes.
    """

    target_sparsity: float = field(
        default=0.25,
        metadata={"help": "fraction of routed decisions to skip, in (0, 1)", "type": "probability"},
    )
    router_hidden: int | None = field(
        default=0,
        metadata={
            "help": "router hidden width: 0 (default) a linear router Linear(d, 2); N > 0 Linear(d, N) -> "
            "ReLU -> Linear(N, 2) (the paper's code: N = d/4; None in Python means d/4)"
        },
    )
    sparsity_weight: float = field(
        default=20.0,
        metadata={
            "help": "weight of the sparsity regulariser sparsity_weight * |target - s| (the paper's alpha)",
            "aliases": ("--alpha",),
        },
    )
    tau_start: float = field(default=5.0, metadata={"help": "Gumbel-softmax temperature at step 0"})
    tau_end: float = field(default=1.0, metadata={"help": "Gumbel-softmax temperature at the last step"})
    threshold: float = field(default=0.5, metadata={"help": "inference: execute iff p(execute) >= threshold"})
    modules: tuple[str, ...] = field(
        default=MODULES, metadata={"help": "routable modules: attn,mlp | attn | mlp"}
    )
    router_init: str = field(
        default="dense",
        metadata={
            "help": "dense: last router layer zero, bias toward execute (starts as the base model); "
            "paper: default init",
            "choices": ROUTER_INITS,
        },
    )
    execute_bias: float = field(
        default=3.0, metadata={"help": "with router init dense: initial logit(execute) - logit(skip)"}
    )
    budget: str = field(
        default="modules",
        metadata={
            "help": "what the target counts: routed decisions (modules), or parameters of skipped modules (params)",
            "choices": BUDGETS,
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the routers' initial weights", "cli": False})
    mlp_router_input: str = field(
        default="block_input",
        metadata={
            "help": "what the MLP router reads: the block input (the paper's code) or the post-attention state",
            "choices": MLP_ROUTER_INPUTS,
        },
    )
    router_norm: str = field(
        default="none",
        metadata={
            "help": "what a router does to the hidden state it reads: nothing (the paper's code) or a "
            "weightless RMS normalisation, so that one optimiser step moves every layer's logits alike",
            "choices": ROUTER_NORMS,
        },
    )

    attn_skip_to: str = field(
        default="identity",
        metadata={
            "help": "what a token that skips attention runs: nothing (identity) or a low-rank substitute (adapter)",
            "choices": SKIP_TARGETS,
        },
    )
    mlp_skip_to: str = field(
        default="identity",
        metadata={
            "help": "what a token that skips the MLP runs: nothing (identity) or a low-rank substitute (adapter)",
            "choices": SKIP_TARGETS,
        },
    )
    substitute_rank: int | None = field(
        default=None,
        metadata={"help": "rank of a substitute (None: hidden_size // 16)"},
    )
    substitute_init: str = field(
        default="zero",
        metadata={
            "help": "substitute init: zero (output side zero: starts as plain skipping) or closed-form "
            "(reduced-rank least-squares fit of the module on calibration tokens)",
            "choices": SUBSTITUTE_INITS,
        },
    )
    substitute_activation: str = field(
        default="identity",
        metadata={
            "help": "activation between a substitute's down and up projections (closed-form needs identity)",
            "choices": SUBSTITUTE_ACTIVATIONS,
        },
    )

    protected_modules: tuple[tuple[int, str], ...] = field(
        default=(),
        metadata={
            "help": "(layer, module) pairs that always execute: their router is constant (execute) and "
            "never trains (train-router --protect K picks the K most important modules)",
            "cli": False,
        },
    )

    def __post_init__(self) -> None:
        self.target_sparsity = _probability("target_sparsity", self.target_sparsity, open_interval=True)
        self.threshold = _probability("threshold", self.threshold, open_interval=False)
        if self.router_hidden is not None and (
            not isinstance(self.router_hidden, int)
            or isinstance(self.router_hidden, bool)
            or self.router_hidden < 0
        ):
            raise SkipGPTError(f"router_hidden must be None or an integer >= 0, got {self.router_hidden!r}")
        for name in ("sparsity_weight", "tau_start", "tau_end", "execute_bias"):
            try:
                setattr(self, name, float(getattr(self, name)))
            except (TypeError, ValueError):
                raise SkipGPTError(f"{name} must be a number, got {getattr(self, name)!r}") from None
        if self.sparsity_weight < 0:
            raise SkipGPTError(f"sparsity_weight must be >= 0, got {self.sparsity_weight}")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise SkipGPTError(f"tau_start and tau_end must be > 0, got {self.tau_start} and {self.tau_end}")
        if isinstance(self.modules, str):
            self.modules = tuple(m.strip() for m in self.modules.split(",") if m.strip())
        if not isinstance(self.modules, list | tuple) or not all(isinstance(m, str) for m in self.modules):
            raise SkipGPTError(f"modules must be a list of names from {list(MODULES)}, got {self.modules!r}")
        self.modules = tuple(self.modules)
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown or not self.modules:
            raise SkipGPTError(
                f"modules must be a non-empty subset of {list(MODULES)}, got {list(self.modules)}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SkipGPTError(f"seed must be an integer, got {self.seed!r}")
        for name, allowed in (
            ("router_init", ROUTER_INITS),
            ("budget", BUDGETS),
            ("mlp_router_input", MLP_ROUTER_INPUTS),
            ("router_norm", ROUTER_NORMS),
            ("attn_skip_to", SKIP_TARGETS),
            ("mlp_skip_to", SKIP_TARGETS),
            ("substitute_init", SUBSTITUTE_INITS),
            ("substitute_activation", SUBSTITUTE_ACTIVATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise SkipGPTError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")

        if self.substitute_rank is not None and (
            not isinstance(self.substitute_rank, int)
            or isinstance(self.substitute_rank, bool)
            or self.substitute_rank < 1
        ):
            raise SkipGPTError(
                f"substitute_rank must be None or an integer >= 1, got {self.substitute_rank!r}"
            )
        self.protected_modules = _module_pairs("protected_modules", self.protected_modules, self.modules)
        if self.substitute_init == "closed-form" and self.substitute_activation != "identity":
            raise SkipGPTError(
                "substitute_init 'closed-form' fits a linear map: it needs substitute_activation "
                f"'identity', got {self.substitute_activation!r}"
            )

    def skip_to(self, module: str) -> str:
        """What a skipped (token, ``module``) runs: 'identity' (nothing) or 'adapter'."""
        return getattr(self, f"{module}_skip_to")

    @property
    def substituted(self) -> tuple[str, ...]:
        """The routed modules whose skipping tokens run a substitute."""
        return tuple(m for m in self.modules if self.skip_to(m) == "adapter")

    def rank_for(self, hidden_size: int) -> int:
        """The substitutes' rank for a model of width ``hidden_size``."""
        return self.substitute_rank or max(1, hidden_size // 16)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = list(self.modules)
        d["protected_modules"] = [list(pair) for pair in self.protected_modules]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SkipGPTConfig:
        """The config of a saved ``router_config``; keys of older versions are migrated
        (``RENAMED_KEYS``: ``alpha`` became ``sparsity_weight``), unknown keys refused."""
        d = dict(d)
        # saved before linear routers became the default: those configs meant d/4 when silent
        d.setdefault("router_hidden", None)
        # saved before routers could normalise their input: they read the raw hidden state
        d.setdefault("router_norm", "none")
        for old, new in RENAMED_KEYS.items():
            if old in d:
                if new in d:
                    raise SkipGPTError(
                        f"router config has both '{old}' and its new name '{new}'; keep '{new}'"
                    )
                d[new] = d.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SkipGPTError(f"unknown SkipGPTConfig keys {unknown}; accepted: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> SkipGPTConfig:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def read_json(path: str | Path) -> dict[str, Any]:
        """Read a whole ``skipgpt_config.json`` (router config + base model spec + metadata)."""
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SkipGPTError(f"{path} not found: not a skipgpt output folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkipGPTError(f"{path} is not valid JSON ({e})") from None
        _check_record(path, record)
        return record


def _module_pairs(name: str, value: Any, modules: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
    """``[[layer, module], ...]`` (layer an integer >= 0, module one of ``modules``) -> sorted
    tuple of pairs; anything else is refused in one line."""
    try:
        pairs = sorted({(layer, module) for layer, module in value})
    except (TypeError, ValueError):
        pairs = None
    ok = pairs is not None and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 and m in modules for i, m in pairs
    )
    if not ok:
        raise SkipGPTError(
            f"{name} must be a list of [layer, module] pairs (layer an integer >= 0, module one of "
            f"{list(modules)}), got {value!r}"
        )
    return tuple(pairs)


# key of skipgpt_config.json -> (accepted types, what to say); every key is optional but these
_RECORD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "base_model": ((str, type(None)), "a model spec (string)"),
    "base_model_in_folder": ((str, type(None)), "a sub-folder name or null"),
    "model_type": ((str,), "a string"),
    "hidden_size": ((int,), "a positive integer"),
    "num_layers": ((int,), "a positive integer"),
    "router_config": ((dict, type(None)), "an object or null"),
    "metadata": ((dict, type(None)), "an object or null"),
}


def _check_record(path: Path, record: Any) -> None:
    """One-line refusal of a ``skipgpt_config.json`` whose known keys have the wrong type."""
    if not isinstance(record, dict):
        raise SkipGPTError(f"{path} must hold a JSON object, got {type(record).__name__}")
    if "base_model" not in record and not record.get("base_model_in_folder"):
        raise SkipGPTError(f"{path} names no base model ('base_model' missing)")
    for key, (types, what) in _RECORD_TYPES.items():
        if key not in record:
            continue
        value = record[key]
        bad = not isinstance(value, types) or isinstance(value, bool)
        if not bad and isinstance(value, int) and value < 1:
            bad = True
        if bad:
            raise SkipGPTError(f"{path}: '{key}' must be {what}, got {value!r}")
