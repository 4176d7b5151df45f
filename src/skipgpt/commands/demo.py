"""``skipgpt demo``: the main job on the offline default.

Router tuning on SmolLM2-135M with the ``calib`` texts, then perplexity of the dense model, the
routed model and random routing at the routed model's own per-(layer, module) skip rates, on
``wiki-heldout`` and ``ptb``, printed as one table (and written to OUTPUT/results.{md,json}).
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    add_device_args,
    add_json_arg,
    emit,
    load_options,
    positive_int,
    seq_len_int,
    warn_if_beyond_positions,
)
from .train_router import add_loop_options, add_recipe_arg, add_router_args

# What a demo writes into its output folder (``routers/`` is a skipgpt output folder).
DEMO_ENTRIES = ("routers", "results.json", "results.md")
# the loop options of the demo (a run of about 25 minutes on 2 cores with native bf16)
DEMO_LOOP_FIELDS = (
    "max_steps",
    "batch_size",
    "lr",
    "lr_scheduler",
    "warmup_ratio",
    "seed",
    "mixed_precision",
)

# The frontier's best recipe (linear routers, closed-form MLP substitutes, parameter budget) at
# the share of parameters that deleting 5 of SmolLM2's 30 layers removes (ShortGPT). The demo of
# 0.1.x (the default recipe, module target 0.25, 150 steps x 4 blocks, fp32) is
# `skipgpt demo --recipe default --budget modules --target-sparsity 0.25 --max-steps 150
# --batch-size 4 --mixed-precision no`.
DEMO_RECIPE = "frontier"
DEMO_TARGET = 0.167
DEMO_LOOP = {"max_steps": 110, "batch_size": 8}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="router tuning on SmolLM2-135M + PPL table (offline)")
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="model spec: smollm2-135m, random:<arch>, a .gguf file, a HF folder or hub id",
    )
    p.add_argument("--output", default="runs/demo", help="output folder")
    p.add_argument("--seq-len", type=seq_len_int, default=256, help="training block length (tokens)")
    p.add_argument(
        "--eval-seq-len", type=positive_int, default=1024, help="evaluation window length (tokens)"
    )
    p.add_argument("--eval-windows", type=positive_int, default=16, help="windows per PPL dataset")
    add_recipe_arg(p, default=DEMO_RECIPE)
    add_loop_options(p, DEMO_LOOP_FIELDS, defaults=DEMO_LOOP)
    add_router_args(p)
    add_device_args(p)
    add_json_arg(p)
    p.set_defaults(func=run, target_sparsity=DEMO_TARGET)


def prepare_demo_dir(path: str | Path) -> Path:
    """Accept a new or empty folder, or an earlier demo's output (rerun); refuse anything else."""
    from ..errors import SkipGPTError

    path = Path(path)
    if not path.exists():
        return path
    if not path.is_dir():
        raise SkipGPTError(f"output {path} exists and is a file; give a new folder or an earlier demo output")
    foreign = sorted(
        p.name
        for p in path.iterdir()
        if p.name not in DEMO_ENTRIES and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )
    if foreign:
        raise SkipGPTError(
            f"output folder {path} exists and holds files a demo does not write ({', '.join(foreign[:3])}); "
            "give a new folder or an earlier demo output"
        )
    return path


def run(args) -> int:
    import time

    from ..baselines.random_routing import random_override
    from ..data import load_blocks
    from ..eval.perplexity import evaluate_perplexity
    from ..eval.speed import machine_string
    from ..eval.tables import markdown_table
    from ..model import get_skipgpt_model
    from ..outputs import atomic_path, write_json_atomic
    from ..specs import load_base_model
    from ..train.router_tuning import train_routers
    from .train_router import (
        apply_recipe,
        loop_args_from_args,
        router_config_from_args,
        tuning_args_from_args,
    )

    apply_recipe(args)
    out = prepare_demo_dir(args.output)  # before any slow work; a rerun replaces the results
    t0 = time.time()
    base, tokenizer = load_base_model(args.model, **load_options(args))
    config = router_config_from_args(args)
    model = get_skipgpt_model(base, config, base_spec=args.model)
    warn_if_beyond_positions(base, args.seq_len)
    train = load_blocks("calib", tokenizer, args.seq_len)
    warn_if_beyond_positions(base, args.eval_seq_len, "--eval-seq-len")
    evalsets = {
        name: load_blocks(name, tokenizer, args.eval_seq_len, max_blocks=args.eval_windows)
        for name in ("wiki-heldout", "ptb")
    }

    loop = loop_args_from_args(args)
    tuning = tuning_args_from_args(args)
    train_routers(
        model,
        train,
        out / "routers",
        loop,
        tuning,
        overwrite=True,
        metadata={"dataset": "calib", "seq_len": args.seq_len, "blocks": int(train.shape[0])},
    )

    # Random routing takes, per dataset, the skip rate of every (layer, module) that the routers
    # realised on that dataset, so both rows skip the same amount of each module in expectation.
    rows = []
    routed_rates: dict[str, dict] = {}
    for name, kind in (
        ("dense", "dense"),
        ("SkipGPT-RT (routers)", "routers"),
        ("random routing, same rates", "random"),
    ):
        row = {"model": name}
        for ds, blocks in evalsets.items():
            if kind == "dense":
                ctx = model.dense()
            elif kind == "routers":
                ctx = model.routing()
            else:
                ctx = model.routing(override=random_override(routed_rates[ds], seed=args.seed))
            with ctx:
                r = evaluate_perplexity(model, blocks, desc=f"{name} {ds}")
            row[f"{ds} ppl"] = r["ppl"]
            row["sparsity"] = r["sparsity"]  # the last dataset's (PTB), as the settings line says
            if kind == "routers":
                st = model.state
                routed_rates[ds] = {k: st.skipped[k] / st.counted[k] for k in st.counted if st.counted[k]}
        rows.append(row)

    table = markdown_table(
        rows,
        [
            ("model", "model"),
            ("module sparsity", lambda r: r["sparsity"]["module"]),
            ("attn", lambda r: r["sparsity"]["attn"]),
            ("mlp", lambda r: r["sparsity"]["mlp"]),
            ("param sparsity", lambda r: r["sparsity"]["params"]),
            ("net of substitutes", lambda r: r["sparsity"]["params_net"]),
            ("wiki-heldout PPL", "wiki-heldout ppl"),
            ("PTB PPL", "ptb ppl"),
        ],
    )
    settings = (
        f"{args.model}, recipe {args.recipe}, target {args.target_sparsity} ({args.budget}), "
        f"{args.max_steps} steps × {args.batch_size}×{args.seq_len} calib tokens, mixed precision "
        f"{loop.mixed_precision}, PPL on the first {args.eval_windows} windows of {args.eval_seq_len} tokens; "
        f"sparsity measured on PTB; {time.time() - t0:.0f} s on {machine_string()}"
    )
    for row in rows:
        row["sparsity"].pop("per_layer", None)
    result = {"rows": rows, "settings": settings, "command": "skipgpt " + " ".join(getattr(args, "argv", []))}
    write_json_atomic(out / "results.json", result)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table + "\n\n" + settings + "\n")
    emit(args, result, table + "\n\n" + settings)
    return 0
