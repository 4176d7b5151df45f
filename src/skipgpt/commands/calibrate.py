"""``skipgpt calibrate``: the compute dial set by a target instead of a θ.

Sets θ of a routed folder so that deterministic routing skips ``--target-sparsity`` of the
decisions (``--budget modules``) or of the attention+MLP parameters (``--budget params``) on
``--calibrate-blocks`` blocks of ``--dataset``. The routers are not changed: the folder is copied to
``--output`` (its LoRA adapter and exported weights with it, not its training checkpoint) with
the new θ, and ``metadata.threshold_calibration`` records θ and the sparsity before and after.
"""

from __future__ import annotations

from .common import (
    add_device_args,
    add_hidden_alias,
    add_json_arg,
    add_model_arg,
    emit,
    load_options,
    positive_int,
    probability,
    refuse_output_at_model,
    seq_len_int,
    warn_if_beyond_positions,
)

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="set θ of a routed folder so that a target sparsity is met (routers unchanged)",
        description=__doc__.split("\n\n", 1)[1].replace("``", ""),
    )
    add_model_arg(p)
    p.add_argument("--target-sparsity", type=probability, required=True, help="share to skip, in (0, 1)")
    from ..config import BUDGETS

    p.add_argument(
        "--budget",
        choices=BUDGETS,
        default=None,
        help="what the target counts: routed decisions or parameters of skipped modules (default: the folder's)",
    )
    p.add_argument("--dataset", default="calib", help="calibration text (data spec, as train-router)")
    p.add_argument("--seq-len", type=seq_len_int, default=256, help="calibration block length (tokens)")
    p.add_argument("--calibrate-blocks", type=positive_int, default=16, help="blocks of --seq-len tokens")
    add_hidden_alias(p, "--calibrate-blocks", "--blocks")
    p.add_argument("--output", required=True, help="new folder for the calibrated copy")
    add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def _routed_folder(folder: str):
    """The record (``checkpoint.FolderRecord``) of a folder that routes by θ; one-line errors for anything else."""
    from .. import checkpoint
    from ..errors import SkipGPTError

    if not checkpoint.is_skipgpt_dir(folder):
        raise SkipGPTError(
            f"{folder} is not a skipgpt output folder (no {checkpoint.CONFIG_NAME}); calibrate takes the folder "
            "of train-router, finetune-lora, baseline mod or export"
        )
    record = checkpoint.read(folder)
    if record.kind == "dense-lora":
        raise SkipGPTError(f"{folder} has no routers (a dense + LoRA folder): there is no θ to set")
    if record.kind == "llm-drop":
        raise SkipGPTError(f"{folder} is LLM-Drop: it removes modules statically and has no θ to set")
    return record


def run(args) -> int:
    import shutil
    from pathlib import Path

    from .. import checkpoint
    from ..data import load_blocks
    from ..loading import load_model
    from ..outputs import prepare_output_dir, staged_dir
    from ..train.loop import CHECKPOINT_DIR
    from ..train.router_tuning import calibrate_and_measure

    record = _routed_folder(args.model)
    refuse_output_at_model(args, "the source folder is left as it is")
    source, output = Path(args.model), Path(args.output)
    prepare_output_dir(output, allow_existing_ours=False)
    model, tokenizer = load_model(str(source), **load_options(args))
    warn_if_beyond_positions(model, args.seq_len)
    blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.calibrate_blocks)
    calibration = calibrate_and_measure(model, blocks, args.target_sparsity, args.budget)
    calibration.update(dataset=args.dataset, seq_len=args.seq_len, source=str(source))
    record = record.replace(
        router_config=model.skipgpt_config,  # θ set by the calibration
        metadata={**record.metadata, "threshold_calibration": calibration},
    )

    with staged_dir(output) as stage:
        for item in source.iterdir():
            if item.name in (CHECKPOINT_DIR, checkpoint.CONFIG_NAME):
                continue
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, stage / item.name)
        checkpoint.write(stage, record)
    summary = {"output": str(output)} | {
        k: calibration[k]
        for k in ("target", "budget", "threshold_before", "sparsity_before", "threshold", "sparsity_after")
    }
    before, after = calibration["sparsity_before"], calibration["sparsity_after"]
    human = (
        f"θ {calibration['threshold_before']:.4f} -> {calibration['threshold']:.4f} for {args.target_sparsity} of the "
        f"{calibration['budget']} on {blocks.shape[0]}×{blocks.shape[1]} tokens of {args.dataset}: module sparsity "
        f"{before['module']:.3f} -> {after['module']:.3f}, params {before['params']:.3f} -> {after['params']:.3f}; "
        f"written to {output}"
    )
    emit(args, summary, human)
    return 0
