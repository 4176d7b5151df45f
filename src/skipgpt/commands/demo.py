"""``skipgpt demo``: the main job on the offline default.

Router tuning on SmolLM2-135M with the ``calib`` texts, then perplexity of the dense model, the
routed model and random routing at the routed model's own per-(layer, module) skip rates, on
``wiki-heldout`` and ``ptb``, printed as one table (and written to OUTPUT/results.{md,json}).
"""

from __future__ import annotations

from .common import add_json_arg, emit, positive_int
from .train_router import add_router_args


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="router tuning on SmolLM2-135M + PPL table (offline)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--output", default="runs/demo", help="output folder")
    p.add_argument("--max-steps", type=positive_int, default=150)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-seq-len", type=positive_int, default=1024)
    p.add_argument("--eval-windows", type=positive_int, default=40, help="windows per PPL dataset")
    p.add_argument("--seed", type=int, default=0)
    add_router_args(p)
    add_json_arg(p)
    p.set_defaults(func=run, target_sparsity=0.25)


def run(args) -> int:
    import time

    from ..baselines.random_routing import random_override
    from ..data import load_blocks
    from ..eval.perplexity import evaluate_perplexity
    from ..eval.tables import markdown_table
    from ..io import prepare_output_dir, write_json_atomic
    from ..model import get_skipgpt_model
    from ..specs import load_base_model
    from ..train.loop import LoopArgs
    from ..train.router_tuning import train_routers
    from .train_router import router_config_from_args, tuning_args_from_args

    out = prepare_output_dir(args.output)
    t0 = time.time()
    base, tokenizer = load_base_model(args.model)
    config = router_config_from_args(args)
    model = get_skipgpt_model(base, config, base_spec=args.model)
    train = load_blocks("calib", tokenizer, args.seq_len)
    evalsets = {
        name: load_blocks(name, tokenizer, args.eval_seq_len, max_blocks=args.eval_windows)
        for name in ("wiki-heldout", "ptb")
    }

    loop = LoopArgs(max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
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

    rows = []
    routed_rates = None
    for name, ctx in (
        ("dense", model.dense),
        ("SkipGPT-RT (routers)", model.routing),
        ("random routing, same rates", None),
    ):
        row = {"model": name}
        for ds, blocks in evalsets.items():
            if ctx is None:
                ctx_now = model.routing(override=random_override(routed_rates, seed=args.seed))
            else:
                ctx_now = ctx()
            with ctx_now:
                r = evaluate_perplexity(model, blocks, desc=f"{name} {ds}")
            row[f"{ds} ppl"] = r["ppl"]
            row["sparsity"] = r["sparsity"]
            if name.startswith("SkipGPT") and ds == "wiki-heldout":
                st = model.state
                routed_rates = {k: st.skipped[k] / st.counted[k] for k in st.counted}
        rows.append(row)

    table = markdown_table(
        rows,
        [
            ("model", "model"),
            ("module sparsity", lambda r: r["sparsity"]["module"]),
            ("attn", lambda r: r["sparsity"]["attn"]),
            ("mlp", lambda r: r["sparsity"]["mlp"]),
            ("param sparsity", lambda r: r["sparsity"]["params"]),
            ("wiki-heldout PPL", "wiki-heldout ppl"),
            ("PTB PPL", "ptb ppl"),
        ],
    )
    settings = (
        f"{args.model}, target {args.target_sparsity} ({args.budget}), {args.max_steps} steps × {args.batch_size}×{args.seq_len} "
        f"calib tokens, PPL on the first {args.eval_windows} windows of {args.eval_seq_len} tokens; "
        f"sparsity measured on PTB; {time.time() - t0:.0f} s"
    )
    for row in rows:
        row["sparsity"].pop("per_layer", None)
    result = {"rows": rows, "settings": settings, "command": "skipgpt " + " ".join(args.argv)}
    write_json_atomic(out / "results.json", result)
    from ..io import atomic_path

    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(table + "\n\n" + settings + "\n")
    emit(args, result, table + "\n\n" + settings)
    return 0
