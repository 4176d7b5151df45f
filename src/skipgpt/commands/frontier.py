"""``skipgpt frontier``: quality against measured speed: dense, SkipGPT, ShortGPT, LLM-Drop and the
static substitute baseline on one frontier.

SkipGPT is one trained router set swept over θ (``--routers DIR``, repeatable, each its own
line; without it one set is trained into ``OUT/models/skipgpt`` as ``skipgpt compare`` trains
it, with ``--budget params``); ShortGPT removes 1..N layers and LLM-Drop drops modules to the
same parameter shares, and the static substitute baseline replaces MLPs by closed-form
substitutes to the same shares (net), all scored on the same calibration text. Every point gets realised
sparsity, PPL on the same windows and its speedup against the dense model timed alternately in
the same run (``skipgpt.experiments.frontier``). Writes ``frontier.{json,md,png}`` into ``--output`` and
keeps finished points in ``frontier.progress.json``: a rerun with the same settings resumes, and one that only adds ``--routers`` sets or ``--thetas`` values measures just the new points.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .bench import threshold_list
from .common import (
    add_config_arg,
    add_device_args,
    add_hidden_alias,
    add_json_arg,
    add_model_arg,
    emit,
    load_options,
    positive_int,
    probability,
    refuse_ignored_options,
    warn_if_beyond_positions,
)

__all__ = ["add_parser", "run"]

DEFAULT_THETAS = "0,0.5,0.6,0.7,0.8,0.9,0.95"
TRAINING = ("target_sparsity", "max_steps", "batch_size", "calibrate_blocks")


def add_parser(sub) -> None:
    from ..experiments.frontier import BASELINES, SCENARIOS, STATISTICS

    p = sub.add_parser(
        "frontier",
        help="quality against measured speed: SkipGPT (θ sweep), ShortGPT, LLM-Drop, static substitutes and dense",
    )
    add_model_arg(p)
    p.add_argument("--output", required=True, help="output folder: frontier.{json,md,png}, progress, models/")
    add_hidden_alias(p, "--output", "--out")
    p.add_argument(
        "--routers",
        action="append",
        default=None,
        help="a trained router folder of --model (repeatable: one line each), swept over --thetas or over "
        "its own θ values given as DIR@θ1,θ2,... (a set whose probabilities sit elsewhere); default: train one set",
    )
    p.add_argument("--thetas", type=threshold_list, default=DEFAULT_THETAS, help="θ values of SkipGPT")
    p.add_argument(
        "--max-layers", type=positive_int, default=None, help="ShortGPT removes 1..N layers (default: ~40%%)"
    )
    p.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="lines beside SkipGPT, at the parameter shares of 1..N layers: shortgpt (layers removed), "
        "llm-drop (modules dropped), substitute (MLPs replaced by closed-form substitutes)",
    )
    p.add_argument(
        "--substitute-rank",
        type=positive_int,
        default=None,
        help="rank of the static substitutes (default: hidden // 16)",
    )
    t = p.add_argument_group("calibration text, and the routers frontier trains itself (no --routers)")
    t.add_argument(
        "--dataset", default="calib", help="calibration and training text: calib | a local file | hub dataset"
    )
    t.add_argument(
        "--seq-len", type=positive_int, default=256, help="calibration/training block length (tokens)"
    )
    t.add_argument(
        "--score-blocks",
        dest="calib_blocks",
        type=positive_int,
        default=32,
        help="ShortGPT/LLM-Drop scoring blocks",
    )
    add_hidden_alias(p, "--score-blocks", "--calib-blocks")
    t.add_argument("--target-sparsity", type=probability, default=0.25, help="parameter sparsity trained for")
    t.add_argument("--max-steps", type=positive_int, default=150, help="router training steps")
    t.add_argument("--batch-size", type=positive_int, default=4, help="training blocks per step")
    t.add_argument("--calibrate-blocks", type=int, default=16, help="θ calibration blocks (0 = none)")
    t.add_argument("--seed", type=int, default=0, help="random seed of training")
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval-datasets", default="wiki-heldout,ptb", help="PPL sets; the first one is summarised"
    )
    e.add_argument(
        "--eval-seq-len", type=positive_int, default=1024, help="evaluation window length (tokens)"
    )
    e.add_argument("--max-windows", type=positive_int, default=16, help="the first K windows of each set")
    e.add_argument("--eval-batch-size", type=positive_int, default=2, help="evaluation windows per forward")
    e.add_argument("--scenarios", default=",".join(SCENARIOS), help="timed scenarios, as skipgpt bench")
    e.add_argument("--repeats", type=positive_int, default=3, help="timed runs per point and scenario")
    e.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    e.add_argument(
        "--decode-steps", type=positive_int, default=32, help="tokens decoded in the decode scenario"
    )
    e.add_argument(
        "--decode-context", type=positive_int, default=384, help="prompt length before decoding (tokens)"
    )
    e.add_argument(
        "--statistic",
        choices=list(STATISTICS),
        default="median",
        help="how the timed runs are read (min: on a shared machine whose other jobs slow single runs); "
        "the runs are kept, so a finished run may be re-read either way",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="discard the progress (and routers trained here) of --output"
    )
    add_device_args(p)
    add_config_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def _check_out(out: Path) -> None:
    from ..errors import SkipGPTError
    from ..experiments.frontier import PROGRESS_NAME

    if out.exists() and (
        not out.is_dir()
        or (any(out.iterdir()) and not ((out / PROGRESS_NAME).exists() or (out / "models").is_dir()))
    ):
        raise SkipGPTError(
            f"--out {out} exists and is not a frontier folder; give a new folder or an earlier --output"
        )


def _router_record(folder: str, layers: int):
    """The record (``checkpoint.FolderRecord``) of a router folder, refused in one line when it
    cannot be a line here."""
    from .. import checkpoint
    from ..errors import SkipGPTError

    if not checkpoint.is_skipgpt_dir(folder):
        raise SkipGPTError(f"--routers {folder} is not a skipgpt output folder (no {checkpoint.CONFIG_NAME})")
    record = checkpoint.read(folder)
    if record.kind in ("dense-lora", "llm-drop"):
        raise SkipGPTError(f"--routers {folder} holds no trained routers")
    if record.num_layers != layers:
        raise SkipGPTError(f"--routers {folder} has {record.num_layers} layers; --model has {layers}")
    return record


def _router_spec(spec: str) -> tuple[str, list[float] | None]:
    """``--routers`` value -> (folder, its own θ values or None): ``DIR@0.6,0.7`` gives
    ``(DIR, [0.6, 0.7])``; a folder whose name holds an ``@`` is read as a folder when it exists."""
    from ..errors import SkipGPTError

    folder, at, tail = spec.rpartition("@")
    if not at or Path(spec).exists():
        return str(Path(spec)), None
    try:
        return str(Path(folder)), threshold_list(tail)
    except argparse.ArgumentTypeError:
        raise SkipGPTError(
            f"--routers {spec}: after '@' give comma-separated θ values in [0, 1], e.g. {folder}@0.6,0.7"
        ) from None


def _training_args(args) -> argparse.Namespace:
    """The options of ``experiments.compare.build_method``'s SkipGPT build that this command has; the
    others take their defaults (the default recipe), as ``train-router``'s would."""
    fields = {k: getattr(args, k) for k in ("model", "dataset", "seq_len", "seed")}
    fields |= {k: getattr(args, k) for k in ("max_steps", "batch_size", "calibrate_blocks", "calib_blocks")}
    return argparse.Namespace(**fields, sparsity=args.target_sparsity, rounding="nearest")


def run(args) -> int:
    import copy
    import shutil

    from ..checkpoint import is_skipgpt_dir
    from ..data import load_blocks
    from ..errors import SkipGPTError
    from ..eval.speed import machine_string
    from ..experiments.compare import build_method, record_target
    from ..experiments.frontier import (
        RouterLine,
        default_max_layers,
        format_frontier_markdown,
        frontier_settings,
        load_progress,
        run_frontier,
    )
    from ..model import SkipGPTModel
    from ..specs import load_base_model
    from . import compare

    out = Path(args.output)
    if is_skipgpt_dir(args.model):
        raise SkipGPTError(
            f"{args.model} is a routed model; frontier needs the base model spec (--routers DIR)"
        )
    if args.routers:
        refuse_ignored_options(args, TRAINING, "--routers gives the router sets, frontier trains none")
    datasets = [d.strip() for d in args.eval_datasets.split(",") if d.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios:
        raise SkipGPTError("--scenarios is empty; give e.g. prefill_1x1024,decode_b1,decode_b8")
    if args.warmup < 0:
        raise SkipGPTError(f"--warmup must be >= 0, got {args.warmup}")
    _check_out(out)
    base, tokenizer = load_base_model(args.model, **load_options(args))
    base.eval()
    layers = base.config.get_text_config(decoder=True).num_hidden_layers
    specs = [_router_spec(f) for f in args.routers or []]
    routers = [folder for folder, _ in specs]
    if len(set(routers)) < len(routers):
        raise SkipGPTError("a --routers folder is given twice; give each router set once")
    records = {folder: _router_record(folder, layers) for folder in routers}
    own_thetas = {folder: thetas for folder, thetas in specs if thetas is not None}
    max_layers = args.max_layers or default_max_layers(layers)
    if max_layers >= layers:
        raise SkipGPTError(f"--max-layers {max_layers} must be below the model's {layers} layers")
    training = None if routers else {k: getattr(args, k) for k in TRAINING} | {"budget": "params"}
    settings = frontier_settings(
        thetas=args.thetas,
        max_layers=max_layers,
        eval_datasets=datasets,
        scenarios=scenarios,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_steps=args.decode_steps,
        decode_context=args.decode_context,
        eval_batch_size=args.eval_batch_size,
        baselines=[b.strip() for b in args.baselines.split(",") if b.strip()],
        substitute_rank=args.substitute_rank,
        model=args.model,
        routers=[f if t is None else f"{f}@{','.join(f'{x:g}' for x in t)}" for f, t in specs],
        training=training,
        dataset=args.dataset,
        seq_len=args.seq_len,
        calib_blocks=args.calib_blocks,
        seed=args.seed,
        eval_seq_len=args.eval_seq_len,
        max_windows=args.max_windows,
    )
    load_progress(out, settings, args.overwrite)  # refuse other settings before any slow work
    if args.overwrite and (out / "models").is_dir():
        shutil.rmtree(out / "models")

    train_blocks = load_blocks(
        args.dataset, tokenizer, args.seq_len, max_blocks=args.calib_blocks if routers else None
    )
    calib = train_blocks[: args.calib_blocks]
    warn_if_beyond_positions(base, args.eval_seq_len, "--eval-seq-len")
    evals = {d: load_blocks(d, tokenizer, args.eval_seq_len, max_blocks=args.max_windows) for d in datasets}

    def loader(folder):
        return lambda: SkipGPTModel.from_pretrained(folder, base_model=copy.deepcopy(base))

    lines = []
    if not routers:
        folder = out / "models" / "skipgpt"
        if record_target("skipgpt", folder) is None:
            spec = compare.build_spec_from_args(_training_args(args))
            build_method("skipgpt", folder, spec, base, tokenizer, train_blocks)
        info = {"routers": str(folder)}
        lines.append(RouterLine("skipgpt", "SkipGPT-RT", loader(folder), info))
    names = [Path(f).name for f in routers]
    for folder, name in zip(routers, names, strict=True):
        unique = names.count(name) == 1
        key = "skipgpt" if len(routers) == 1 else f"skipgpt:{name if unique else folder}"
        info = {"routers": folder, "calibrated_threshold": records[folder].router_config.threshold}
        label = f"SkipGPT-RT ({name if unique else folder})"
        lines.append(RouterLine(key, label, loader(folder), info, own_thetas.get(folder)))

    result = run_frontier(
        base,
        tokenizer,
        out=out,
        routers=lines,
        calib=calib,
        evals=evals,
        settings=settings,
        base_spec=args.model,
        machine=machine_string(),
        overwrite=args.overwrite,
        statistic=args.statistic,
    )
    summary = {k: result[k] for k in ("points", "summary", "machine", "settings")} | {
        "output": str(out),
        "out": str(out),
    }
    for p in summary["points"]:
        p.pop("times_s", None)
    emit(args, summary, format_frontier_markdown(result) + f"\n\nwritten to {out}/frontier.md, .json, .png")
    return 0
