"""The training loop both stages share: accelerate, progress bar, atomic checkpoints, exact resume.

Everything a step depends on is a function of the step number: which blocks form its batch
(an epoch-seeded permutation), the RNG seed of its Gumbel noise, the temperature and the
learning rate. So a run resumed from a checkpoint at step k computes exactly the steps an
uninterrupted run would have computed from k on.

A finished output holds no optimizer state: once the final model is in place
(``finish_output``), ``checkpoint/`` (trainable weights, optimizer, scheduler, trainer state) is
removed, unless ``LoopArgs.keep_checkpoint`` (``--keep-checkpoint``) asks to keep it for a later
``--resume`` with more steps. A finished folder without it refuses ``--resume`` in one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import CONFIG_NAME
from ..errors import SkipGPTError
from ..outputs import fault_point, lock_output, lock_until_saved, prepare_output_dir, recover_dir, staged_dir

__all__ = [
    "LoopArgs",
    "train_loop",
    "CHECKPOINT_DIR",
    "MIXED_PRECISION",
    "REPORT_TO",
    "TRACKER_PACKAGES",
    "LOGS_DIR",
    "batch_indices",
    "make_accelerator",
    "resolve_mixed_precision",
    "save_on_main_process",
    "finish_output",
    "discard_checkpoint",
    "claim_output_dir",
    "verify_checkpoint",
    "has_checkpoint",
    "MANIFEST_NAME",
    "set_gradient_checkpointing",
]

CHECKPOINT_DIR = "checkpoint"
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
# --report-to: accelerate tracker name -> the package it needs (not a dependency of skipgpt)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
REPORT_TO = ("none", *TRACKER_PACKAGES)
LOGS_DIR = "logs"  # <output>/logs: the TensorBoard event files of --report-to tensorboard
# step_fn(forward, input_ids (B, T), step) -> (loss, metrics); call `forward` (the accelerate-prepared
# model, e.g. DDP-wrapped) for the differentiable forward so that gradients are synchronised.
StepFn = Callable[[Callable, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported (the tracker of ``--report-to``)."""
    return importlib.util.find_spec(package) is not None


@dataclass
class LoopArgs:
    """Optimisation settings of either stage (defaults: stage 1's; ``recipes.LORA_LOOP`` stage 2's).

    Metadata as ``SkipGPTConfig``'s: the help and type of each CLI flag."""

    max_steps: int = field(default=300, metadata={"help": "optimiser steps", "type": "positive_int"})
    batch_size: int = field(
        default=8, metadata={"help": "blocks per micro-step and process", "type": "positive_int"}
    )
    grad_accum: int = field(
        default=1, metadata={"help": "micro-steps accumulated per step", "type": "positive_int"}
    )
    lr: float = field(default=2e-3, metadata={"help": "learning rate"})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "transformers scheduler name (constant, cosine, linear)"}
    )
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of the steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "cli": False})
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "gradient clipping norm (None: no clipping)", "cli": False}
    )
    seed: int = field(default=0, metadata={"help": "seed of the batch order and Gumbel noise"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps", "type": "positive_int"})
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "autocast the forward (bf16 on CPU or recent GPUs, fp16 on GPUs); routers stay fp32. "
            "auto: the accelerate launch setting if any, else bf16 where the hardware multiplies bf16 "
            "natively (a CPU with AVX-512 BF16 or AMX, a GPU with bf16), else no; stored resolved",
            "choices": MIXED_PRECISION,
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute decoder layers in backward: less activation memory for long sequences"},
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": f"log every step's metrics through accelerate's trackers: tensorboard (into <output>/{LOGS_DIR}), "
            "wandb, or none",
            "choices": REPORT_TO,
        },
    )
    keep_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "keep checkpoint/ (optimizer, scheduler, trainer state) in the finished output, "
            "to --resume it later with more steps"
        },
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SkipGPTError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0:
            raise SkipGPTError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise SkipGPTError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise SkipGPTError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        self.mixed_precision = resolve_mixed_precision(self.mixed_precision)
        if self.report_to not in REPORT_TO:
            raise SkipGPTError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        package = TRACKER_PACKAGES.get(self.report_to)
        if package is not None and not _installed(package):
            raise SkipGPTError(
                f"--report-to {self.report_to} needs the package '{package}', which is not installed; "
                f"install it with: pip install {package} (or give --report-to none)"
            )


def claim_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """The training output folder, locked for this run, refused in one line before any slow work when

    * it is a foreign folder or a file (``prepare_output_dir``);
    * it cannot be written (checked by writing a probe into it, or into the nearest existing
      parent when it does not exist yet), so that no training is lost to a late PermissionError;
    * another run writes it (``outputs.lock_output``: the lock beside the folder, which ``train_loop``
      holds from its start until the final model is in place; the refusal names the holder's pid);
    * it holds a finished model and neither ``resume`` nor ``overwrite`` is set;
    * it holds an interrupted run (a checkpoint, no model) and neither is set: starting again at
      step 0 would silently discard that checkpoint.

    While it holds the lock, what a killed run left is tidied (``outputs.recover_dir``): a swap cut between its
    renames is finished or undone, stale stage folders are deleted, each said on stderr.
    """
    import sys
    import tempfile

    from ..outputs import release_output

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        prepare_output_dir(output_dir)  # the one-line refusal of a file
    probe_dir = output_dir
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as e:
        raise SkipGPTError(f"cannot write to {output_dir} ({e.strerror} in {probe_dir})") from None
    from ..outputs import holds_output

    held = holds_output(output_dir)
    lock_output(output_dir)  # refuses while another run writes there
    try:
        done = recover_dir(output_dir, inside=False)  # the folder first, then its checkpoint
        done += recover_dir(output_dir / CHECKPOINT_DIR, accept=lambda p: verify_checkpoint(p) is None)
        done += recover_dir(output_dir)
        for what in done:
            print(f"note: {output_dir}: {what}", file=sys.stderr)
        prepare_output_dir(output_dir)  # after the recovery: a cut swap can leave no checkpoint/ yet
        if not (resume or overwrite):
            if (output_dir / CONFIG_NAME).exists():
                raise SkipGPTError(
                    f"{output_dir} already holds a trained model; pass --resume to continue or --overwrite"
                )
            if has_checkpoint(output_dir):
                raise SkipGPTError(
                    f"{output_dir} holds an interrupted run (a checkpoint, no final model); pass --resume "
                    "to continue it or --overwrite to start again"
                )
        elif (
            resume
            and not overwrite
            and (output_dir / CONFIG_NAME).exists()
            and not has_checkpoint(output_dir)
        ):
            raise SkipGPTError(
                f"{output_dir} holds a finished model without its training checkpoint (removed when it "
                "finished; train with --keep-checkpoint to resume later); pass --overwrite to train again"
            )
    finally:
        if not held:  # train_loop holds it while the run writes (model loading is no write)
            release_output(output_dir)
    return output_dir


def batch_indices(
    num_blocks: int, step: int, micro: int, rank: int, args: LoopArgs, world: int
) -> torch.Tensor:
    """Block indices of one micro-batch. The global batch of a step is
    ``batch_size * grad_accum * world`` consecutive entries of an epoch-seeded permutation."""
    global_batch = args.batch_size * args.grad_accum * world
    start = step * global_batch + (micro * world + rank) * args.batch_size
    positions = torch.arange(start, start + args.batch_size)
    epochs = positions // num_blocks
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % num_blocks]
    return out


def make_accelerator(
    mixed_precision: str = "no", report_to: str = "none", project_dir: str | Path | None = None
):
    """An ``Accelerator`` with this autocast setting (the launcher's process group is kept) and,
    unless ``report_to`` is ``"none"``, that tracker (logging under ``project_dir``).

    accelerate keeps one global state per process; a second run in the same process (tests,
    notebooks) with another precision would be refused, so only that part is reset.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    # Without a GPU, `accelerate launch --multi_gpu` / `torchrun` processes must still form a
    # process group: cpu=True makes accelerate pick MULTI_CPU with gloo (it otherwise only does
    # so under mpirun). On a single process it changes nothing.
    cpu_only = not torch.accelerator.is_available()
    try:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            cpu=cpu_only,
            log_with=None if report_to == "none" else report_to,
            project_dir=project_dir,
        )
    except ValueError as e:  # e.g. bf16 on a GPU without bf16
        raise SkipGPTError(f"--mixed-precision {mixed_precision}: {str(e).splitlines()[0]}") from None
    if mixed_precision == "fp16" and not accelerator.native_amp:
        # accelerate would silently train in fp32 here
        raise SkipGPTError(f"--mixed-precision fp16 needs a GPU; on {accelerator.device.type} use bf16 or no")
    if mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        import warnings

        warnings.warn(
            "--mixed-precision bf16 on a CPU without AVX-512 BF16 or AMX: the bf16 matmuls are emulated and "
            "training runs many times slower than fp32 (results/train_throughput_bf16_2x128.md: 16x)",
            stacklevel=2,
        )
    return accelerator


def resolve_mixed_precision(value: str) -> str:
    """``value`` unless it is ``"auto"``; ``"auto"``: what ``accelerate launch`` asked for
    (``ACCELERATE_MIXED_PRECISION``) if anything, else ``"bf16"`` where bf16 runs natively (a CUDA
    GPU with bf16, else a CPU with AVX-512 BF16 or AMX), else ``"no"``. On a CPU without them bf16
    is emulated and many times slower than fp32 (results/train_throughput_bf16_2x128.md)."""
    if value != "auto":
        return value
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if launcher in MIXED_PRECISION and launcher != "auto":
        return launcher
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), as bf16 autocast needs to
    be faster than fp32; False when torch cannot tell."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def save_on_main_process(save, *args, **kwargs) -> None:
    """Under ``accelerate launch`` every rank holds the same trained weights: rank 0 calls
    ``save(*args, **kwargs)``, the others wait for it (one process: just saves)."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        save(*args, **kwargs)
    state.wait_for_everyone()


def discard_checkpoint(output_dir: str | Path) -> bool:
    """Remove ``output_dir/checkpoint`` (optimizer, scheduler, trainer state) from a finished
    output; returns whether there was one. It is first renamed to a hidden temp name, so a kill
    leaves the whole checkpoint or a stale entry that the next writer's ``recover_dir`` deletes."""
    import shutil
    import tempfile

    from ..outputs import holds_output, release_output

    ckpt = Path(output_dir) / CHECKPOINT_DIR
    if not ckpt.is_dir():
        return False
    held = holds_output(output_dir)
    try:
        lock_output(output_dir)  # the final swap released it; another run may have taken it since
    except SkipGPTError:
        return False  # that run owns the folder now: leave its checkpoint alone
    try:
        trash = Path(tempfile.mkdtemp(prefix=".checkpoint.discard-", suffix=".tmp", dir=output_dir))
        os.replace(ckpt, trash / CHECKPOINT_DIR)
        fault_point("discard:checkpoint")
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        if not held:
            release_output(output_dir)
    return True


def finish_output(output_dir: str | Path, *, keep_checkpoint: bool = False) -> None:
    """Called once the final model is in place (``save_on_main_process``): remove the training
    checkpoint of ``output_dir`` (main process) unless ``keep_checkpoint``."""
    from accelerate import PartialState

    if not keep_checkpoint and PartialState().is_main_process:
        discard_checkpoint(output_dir)


def _rank_divergence(accelerator, prepared, params: list[torch.nn.Parameter]) -> float:
    """Largest difference between ranks of per-tensor (sum, sum of squares) of ``params``.

    0.0 when every rank holds the same weights, which is what synchronised gradients give;
    ranks that trained on their own shards without an all-reduce drift apart at once. Only
    replicated (DDP) training is checked: FSDP / ZeRO-3 ranks hold different shards by design.
    """
    from torch.nn.parallel import DistributedDataParallel

    if accelerator.num_processes == 1 or not isinstance(prepared, DistributedDataParallel):
        return 0.0
    sums = torch.stack(
        [torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for p in params]
    ).flatten()
    every = accelerator.gather(sums.to(accelerator.device)[None]).cpu()
    return float((every - every[0]).abs().max())


def set_gradient_checkpointing(model: torch.nn.Module, enable: bool) -> None:
    """Turn on/off transformers' activation checkpointing of the decoder layers.

    ``RoutedDecoderLayer`` is a ``GradientCheckpointingLayer``, so the routed layers are the
    checkpointed units; non-reentrant checkpointing keeps the router gates' side outputs (the
    skip rates of the sparsity loss) differentiable and replays the same Gumbel noise.
    """
    if not enable:
        if getattr(model, "is_activation_checkpointing", False):
            model.activation_checkpointing_disable()
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SkipGPTError(f"{type(model).__name__} does not support gradient checkpointing")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


MANIFEST_NAME = "manifest.json"
_CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "trainer_state.json")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_checkpoint(
    path: Path, named_params: dict[str, torch.nn.Parameter], optimizer, scheduler, state: dict
) -> None:
    """Write a checkpoint as one unit: complete in its own stage folder, with a manifest (step,
    size and sha256 of every file) written last, then swapped in for the previous one by
    renames (``outputs.swap_in``). A kill leaves the previous checkpoint or this one, never a mix of
    the two (the file-by-file writer once left step-15 weights beside a step-10 state)."""
    with staged_dir(path, keep_old=False) as stage:
        save_file(
            {k: p.detach().cpu().contiguous() for k, p in named_params.items()},
            str(stage / "trainable.safetensors"),
        )
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, stage / "optimizer.pt"
        )
        fault_point("checkpoint:files")
        (stage / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        manifest = {
            "format": 1,
            "step": state["step"],
            "files": {
                name: {"size": (stage / name).stat().st_size, "sha256": _sha256(stage / name)}
                for name in _CHECKPOINT_FILES
            },
        }
        (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be trusted (one phrase), or None when it is
    whole: its manifest names exactly its files, with their sizes and sha256, and the step of
    its trainer state. A folder without a manifest (written before manifests existed) is
    reported by the caller, not here."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        files, step = manifest["files"], manifest["step"]
        if not isinstance(files, dict) or sorted(files) != sorted(_CHECKPOINT_FILES):
            return "its manifest does not list the checkpoint files"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_NAME} is unreadable"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("size"):
            return f"{name} has {f.stat().st_size} bytes, the manifest says {want.get('size')}"
        if _sha256(f) != want.get("sha256"):
            return f"{name} differs from the manifest (sha256)"
    try:
        state_step = json.loads((path / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    if state_step != step:
        return f"trainer_state.json says step {state_step}, the manifest step {step}"
    return None


def has_checkpoint(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a checkpoint (whole or not) that --resume would read."""
    ckpt = Path(output_dir) / CHECKPOINT_DIR
    return (ckpt / "trainer_state.json").exists() or (ckpt / MANIFEST_NAME).exists()


def _checked_checkpoint(path: Path) -> Path:
    """The checkpoint folder to resume from, refused in one line when it is torn or foreign.

    Without a manifest (an older skipgpt) it is resumed as before, with a warning: its files
    cannot be checked against each other."""
    if not (path / MANIFEST_NAME).exists():
        if not (path / "trainer_state.json").exists():
            raise SkipGPTError(
                f"no checkpoint to resume from in {path.parent} (missing {path.name}/trainer_state.json)"
            )
        import warnings

        warnings.warn(
            f"checkpoint {path} has no {MANIFEST_NAME} (written by an older skipgpt): resuming without "
            "checking that its files belong together",
            stacklevel=3,
        )
        return path
    why = verify_checkpoint(path)
    if why is not None:
        raise SkipGPTError(
            f"checkpoint {path} is torn or foreign ({why}); resuming it would continue from a state no "
            "run had: pass --overwrite to start again"
        )
    return path


def load_trainable(path: Path, named_params: dict[str, torch.nn.Parameter]) -> None:
    """The trainable weights of checkpoint ``path`` into ``named_params`` (same names, in place)."""
    tensors = load_file(str(path / "trainable.safetensors"))
    if set(tensors) != set(named_params):
        raise SkipGPTError(
            f"checkpoint {path} holds other trainable parameters than this run; start a new --output"
        )
    with torch.no_grad():
        for k, p in named_params.items():
            p.copy_(tensors[k])


def _load_checkpoint(path: Path, named_params: dict[str, torch.nn.Parameter], optimizer, scheduler) -> dict:
    path = _checked_checkpoint(path)
    load_trainable(path, named_params)
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((path / "trainer_state.json").read_text())


# settings that do not change what a resumed run computes
_RESUME_INDIFFERENT = ("save_every", "report_to", "keep_checkpoint")


def _differing_settings(saved: dict | None, now: dict) -> list[str]:
    """'name (checkpoint X, now Y)' for each LoopArgs field that changes the result."""
    if not saved:
        return []
    return [
        f"{k} (checkpoint {saved.get(k)!r}, now {now[k]!r})"
        for k in now
        if k not in _RESUME_INDIFFERENT and saved.get(k) != now[k]
    ]


def train_loop(
    model: torch.nn.Module,
    named_params: dict[str, torch.nn.Parameter],
    blocks: torch.Tensor,
    args: LoopArgs,
    step_fn: StepFn,
    output_dir: str | Path,
    *,
    resume: bool = False,
    desc: str = "training",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    lr_scale: dict[str, float] | None = None,
) -> list[dict[str, float]]:
    """Optimise ``named_params`` for ``args.max_steps`` steps; return the per-step metric history.

    ``step_fn(forward, input_ids (B, T), step) -> (loss, metrics)`` computes one micro-batch.
    Checkpoints go to ``output_dir/checkpoint`` every ``args.save_every`` steps and at the end.
    ``lr_scale`` (name -> factor, default 1) gives some parameters another learning rate
    (SkipGPT-Joint: routers and LoRA in one run).

    The run holds ``output_dir``'s lock (``outputs.lock_output``) from here until the final model
    is in place (the writer's swap releases it); an exception releases it at once.
    """
    with lock_until_saved(output_dir):
        from transformers import get_scheduler

        logs = Path(output_dir) / LOGS_DIR
        accelerator = make_accelerator(args.mixed_precision, args.report_to, logs)
        if args.report_to != "none":  # one run per output folder; hyper-parameters as scalars/strings
            config = {
                k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in asdict(args).items()
            }
            accelerator.init_trackers(Path(output_dir).resolve().name or "skipgpt", config=config)
        world, rank = accelerator.num_processes, accelerator.process_index
        params = list(named_params.values())
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, p in named_params.items():
            groups.setdefault((lr_scale or {}).get(name, 1.0), []).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": args.lr * s} for s, ps in groups.items()],
            lr=args.lr,
            weight_decay=args.weight_decay,
        )
        scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(args.warmup_ratio * args.max_steps),
            num_training_steps=args.max_steps,
        )
        prepared, optimizer = accelerator.prepare(model, optimizer)
        ckpt = Path(output_dir) / CHECKPOINT_DIR
        history: list[dict[str, float]] = []
        start = 0
        if resume:
            state = _load_checkpoint(ckpt, named_params, optimizer, scheduler)
            start, history = state["step"], state["history"]
            differ = _differing_settings(state.get("loop_args"), asdict(args))
            if differ:
                raise SkipGPTError(
                    "--resume needs the same training settings as the interrupted run; they differ in "
                    + ", ".join(differ)
                )

        model.train()
        set_gradient_checkpointing(model, args.gradient_checkpointing)
        bar = tqdm(
            total=args.max_steps,
            initial=start,
            desc=desc,
            disable=not (progress and accelerator.is_main_process),
        )
        for step in range(start, args.max_steps):
            fault_point("step")  # tests: a kill between steps (SKIPGPT_TEST_PAUSE_AT=step#n)
            sums: dict[str, float] = {}
            for micro in range(args.grad_accum):
                # Gumbel noise seeded by the global shard (micro-step x rank) of this step's batch, so
                # N processes x batch B equal one process x batch B with grad_accum N, noise included.
                torch.manual_seed(args.seed * 1_000_003 + step * 1009 + micro * world + rank)
                idx = batch_indices(blocks.shape[0], step, micro, rank, args, world)
                batch = blocks[idx].to(accelerator.device)
                # DDP all-reduces on the last micro-step only; the others just accumulate locally
                sync = (
                    contextlib.nullcontext()
                    if micro == args.grad_accum - 1
                    else accelerator.no_sync(prepared)
                )
                with sync:
                    loss, metrics = step_fn(prepared, batch, step)
                    if not math.isfinite(float(loss.detach())):
                        raise SkipGPTError(
                            f"training loss is {float(loss.detach())} at step {step}; stopped (nothing saved "
                            "from this step on): lower --lr, or check the data (--seq-len, blocks)"
                        )
                    accelerator.backward(loss / args.grad_accum)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / args.grad_accum
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                keys = sorted(sums)
                reduced = accelerator.reduce(
                    torch.tensor([sums[k] for k in keys], device=accelerator.device), "mean"
                )
                sums = dict(zip(keys, reduced.tolist(), strict=True))
            sums["lr"] = scheduler.get_last_lr()[0]
            history.append({"step": step, **sums})
            if args.report_to != "none":
                accelerator.log(sums, step=step)
            bar.update(1)
            bar.set_postfix(
                {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in sums.items() if k != "lr"}
            )
            done = step + 1
            if done % args.save_every == 0 or done == args.max_steps:
                # every rank must join the gather; a difference means gradients were not all-reduced
                divergence = _rank_divergence(accelerator, prepared, params)
                if divergence > 0:
                    raise SkipGPTError(
                        f"trainable weights differ across the {world} processes at step {done} "
                        f"(checksum difference {divergence:.3g}): gradients are not being synchronised"
                    )
                if accelerator.is_main_process:
                    state = {
                        "step": done,
                        "history": history,
                        "loop_args": asdict(args),
                        "processes": world,
                        "rank_divergence": divergence,
                    }
                    _save_checkpoint(ckpt, named_params, optimizer, scheduler, state)
            accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(step, sums)
        bar.close()
        if args.report_to != "none":
            accelerator.end_training()
        set_gradient_checkpointing(model, False)
        return history
