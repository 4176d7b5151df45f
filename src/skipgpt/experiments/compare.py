"""The comparison study: each method built at one parameter budget from one base model, loaded
back as ``load_model`` would, and its prefill timed against the dense model in the same run.

``skipgpt compare`` (one budget, PPL / zero-shot / prefill speed per method) and ``skipgpt
frontier`` (SkipGPT's training) build their models here; the commands only parse options and
write tables.

Methods (``METHODS``): ``skipgpt`` (routers, parameter budget), ``shortgpt`` (whole layers
removed by Block Influence), ``llm-drop`` (attention/MLP modules removed by importance),
``mod`` (Mixture-of-Depths-style top-k routers, MoD-D). Also accepted, not run by default
(``OPTIONAL_METHODS``): ``substitute`` (the MLPs of lowest importance replaced by closed-form
low-rank substitutes, ``baselines.substitute``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import checkpoint

if TYPE_CHECKING:  # torch and training load when a method is built, not when the CLI starts
    import torch

    from ..config import SkipGPTConfig
    from ..train.loop import LoopArgs
    from ..train.router_tuning import RouterTuningArgs

__all__ = [
    "METHODS",
    "OPTIONAL_METHODS",
    "ALL_METHODS",
    "BuildSpec",
    "build_method",
    "record_target",
    "load_built",
    "measure_prefill",
]

METHODS = ("skipgpt", "shortgpt", "llm-drop", "mod")  # the default set
OPTIONAL_METHODS = ("substitute",)
ALL_METHODS = METHODS + OPTIONAL_METHODS


@dataclass(frozen=True)
class BuildSpec:
    """How every method is built: the base, the data, the budget, and the trained methods' recipe.

    ``sparsity`` is the parameter budget; ``calib_blocks`` the first training blocks the static
    methods score layers/modules on; ``config``/``tuning``/``loop`` the router config (its target
    and budget are set per method), the stage-1 loss and the loop of the trained methods.
    """

    base_spec: str
    dataset: str
    seq_len: int
    sparsity: float
    config: SkipGPTConfig
    tuning: RouterTuningArgs
    loop: LoopArgs
    seed: int = 0
    calib_blocks: int = 16
    rounding: str = "nearest"


def record_target(method: str, folder: Path) -> float | None:
    """Target sparsity a finished folder was built for, or None when the folder is not finished."""
    done = checkpoint.is_output_dir(folder) if method == "shortgpt" else checkpoint.is_skipgpt_dir(folder)
    if not done:
        return None
    rec = checkpoint.read(folder)
    meta = rec.metadata
    if method == "shortgpt":
        return meta["target_sparsity"]
    return meta.get("target_sparsity", meta.get("skip_rate", rec.router_config.target_sparsity))


def build_method(
    method: str,
    folder: Path,
    spec: BuildSpec,
    base,
    tokenizer,
    train_blocks: torch.Tensor,
    progress: bool = True,
) -> None:
    """Build ``method``'s model of ``base`` (a copy; ``base`` is left as it is) into ``folder``.

    train_blocks: (N, seq_len) token ids; the trained methods resume a checkpoint left in
    ``folder`` by an interrupted build.
    """
    import torch

    from ..baselines.llm_drop import llm_drop_prune, save_llm_drop
    from ..baselines.mod import train_mod
    from ..baselines.shortgpt import save_pruned, shortgpt_prune
    from ..model import get_skipgpt_model
    from ..train.loop import CHECKPOINT_DIR
    from ..train.router_tuning import train_routers

    calib = train_blocks[: spec.calib_blocks]
    resume = (folder / CHECKPOINT_DIR / "trainer_state.json").exists()
    meta = {
        "dataset": spec.dataset,
        "seq_len": spec.seq_len,
        "blocks": int(train_blocks.shape[0]),
        "target_sparsity": spec.sparsity,
    }
    model = copy.deepcopy(base)
    if method == "skipgpt":
        torch.manual_seed(spec.seed)
        config = spec.config.replace(target_sparsity=spec.sparsity, budget="params")
        routed = get_skipgpt_model(model, config, base_spec=spec.base_spec)
        train_routers(
            routed,
            train_blocks,
            folder,
            spec.loop,
            spec.tuning,
            resume=resume,
            metadata=meta,
            progress=progress,
        )
    elif method == "mod":
        torch.manual_seed(spec.seed)
        routers = {k: getattr(spec.config, k) for k in ("router_hidden", "router_init", "execute_bias")}
        train_mod(
            model,
            train_blocks,
            spec.sparsity,
            folder,
            spec.loop,
            dataclasses.replace(spec.tuning, curriculum=0.0),  # top-k fixes the rate from step 0
            base_spec=spec.base_spec,
            router_config=routers,
            resume=resume,
            metadata=meta,
            progress=progress,
        )
    elif method == "shortgpt":
        record = shortgpt_prune(model, calib, spec.sparsity, rounding=spec.rounding, progress=progress)
        record.update(base_model=spec.base_spec)
        record["calibration"]["dataset"] = spec.dataset
        save_pruned(model, tokenizer, folder, record, overwrite=True)
    elif method == "llm-drop":
        routed, record = llm_drop_prune(
            model, calib, spec.sparsity, base_spec=spec.base_spec, rounding=spec.rounding, progress=progress
        )
        record["calibration"]["dataset"] = spec.dataset
        save_llm_drop(routed, folder, record, overwrite=True)
    elif method == "substitute":
        from ..baselines.substitute import save_static_substitute, static_substitute_prune

        routed, record = static_substitute_prune(
            model, calib, spec.sparsity, base_spec=spec.base_spec, rounding=spec.rounding, progress=progress
        )
        record["calibration"]["dataset"] = spec.dataset
        save_static_substitute(routed, folder, record, overwrite=True)
    else:
        from ..errors import SkipGPTError

        raise SkipGPTError(f"unknown method {method!r}; accepted: {', '.join(ALL_METHODS)}")


def load_built(method: str, folder: Path, base):
    """(model, metadata) of a finished folder, as ``load_model`` builds it (``base`` copied)."""
    from ..model import SkipGPTModel
    from ..specs import load_base_model

    if method == "shortgpt":
        model, _ = load_base_model(str(folder))
        return model.eval(), checkpoint.read(folder).metadata
    model = SkipGPTModel.from_pretrained(folder, base_model=copy.deepcopy(base)).eval()
    return model, model.metadata


def _prefill_seconds(model, ids: torch.Tensor) -> float:
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)  # prefill into a fresh cache, last logits only
        return time.perf_counter() - t0


def measure_prefill(
    dense, model, ids: torch.Tensor, repeats: int = 3, warmup: int = 1, routing=contextlib.nullcontext
) -> dict:
    """Prefill tokens/s of ``model`` (under ``routing()``) and of ``dense``, timed alternately.

    ids: (B, T). Medians of ``repeats`` timings after ``warmup``; speedup = model / dense tok/s.
    """
    td, tm = [], []
    for r in range(warmup + repeats):
        a = _prefill_seconds(dense, ids)
        with routing():
            b = _prefill_seconds(model, ids)
        if r >= warmup:
            td.append(a)
            tm.append(b)
    n = ids.numel()
    d, m = n / statistics.median(td), n / statistics.median(tm)
    return {"prefill_tok_s": round(m, 2), "dense_tok_s": round(d, 2), "speedup": round(m / d, 4), "tokens": n}
