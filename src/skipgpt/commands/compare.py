"""``skipgpt compare``: SkipGPT-RT against ShortGPT, LLM-Drop and MoD-D at one parameter budget.

Every method gets the same budget in *parameter sparsity* (parameters of skipped/removed
attention+MLP modules over those of all decoder layers, DESIGN.md). SkipGPT-RT is trained with
``--budget params`` and its θ calibrated to the target; MoD-D is router-tuned with the same data,
steps and seed; the static methods remove whole units, rounded to the nearest achievable share.
Each row reports the sparsity it *realised* on the evaluation text, PPL on each evaluation set,
and prefill speed against the dense model (the two timed alternately, median of repeats).

Models are built into ``OUT/models/<method>/`` and then loaded back from there (so the table is
of what ``load_model`` gives); an interrupted run re-uses finished folders and resumes training
from checkpoints. ``OUT/compare.json`` and ``OUT/compare.md`` are rewritten (atomically) after
every row.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path

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
    seq_len_int,
    warn_if_beyond_positions,
)

__all__ = ["add_parser", "run", "build_spec_from_args", "format_compare_table"]

LABELS = {
    "dense": "Dense",
    "skipgpt": "SkipGPT-RT",
    "shortgpt": "ShortGPT",
    "llm-drop": "LLM-Drop",
    "mod": "MoD-D (top-k)",
    "mod-causal": "MoD-D (θ, causal)",
    "substitute": "Static substitutes",
}
# the options a table depends on, recorded in compare.json
SETTINGS = (
    "methods dataset seq_len max_blocks max_steps batch_size grad_accum lr lr_scheduler warmup_ratio "
    "mixed_precision seed alpha tau_start tau_end distill_temperature "
    "router_hidden router_init execute_bias lm_weight distill_weight curriculum calibrate_blocks calib_blocks "
    "rounding eval_seq_len max_windows eval_batch_size speed_tokens speed_batch speed_repeats tasks limit"
).split()
SETTING_DESTS = {"alpha": "sparsity_weight"}  # compare.json keeps its key of the renamed option
# the SkipGPTConfig flags of compare; the budget is --target-sparsity in parameters for every method
ROUTER_FIELDS = ("sparsity_weight", "tau_start", "tau_end", "router_hidden", "router_init", "execute_bias")
BUDGET = "parameter sparsity: parameters of skipped attention/MLP modules (per token) / attention+MLP parameters of all decoder layers"


def add_parser(sub) -> None:
    from ..baselines.scores import ROUNDINGS
    from ..experiments.compare import METHODS, OPTIONAL_METHODS
    from .train_router import LOOP_FIELDS, add_loop_options, add_router_args

    p = sub.add_parser("compare", help="SkipGPT-RT vs ShortGPT, LLM-Drop, MoD-D at one parameter budget")
    add_model_arg(p)
    p.add_argument(
        "--target-sparsity",
        dest="sparsity",
        type=probability,
        default=0.25,
        help="parameter sparsity of every method",
    )
    add_hidden_alias(p, "--target-sparsity", "--sparsity")
    p.add_argument("--output", required=True, help="output folder: models/, compare.json, compare.md")
    add_hidden_alias(p, "--output", "--out")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"subset of {','.join(METHODS + OPTIONAL_METHODS)} (dense always; default {','.join(METHODS)})",
    )
    t = p.add_argument_group("training / calibration (the same for SkipGPT-RT and MoD-D)")
    t.add_argument(
        "--dataset", default="calib", help="training and calibration text: calib | a local file | hub dataset"
    )
    t.add_argument("--seq-len", type=seq_len_int, default=256, help="training block length (tokens)")
    t.add_argument(
        "--max-blocks", type=positive_int, default=None, help="use at most this many blocks of --dataset"
    )
    add_loop_options(t, [f for f in LOOP_FIELDS if f != "gradient_checkpointing"])
    add_router_args(
        p,
        fields=ROUTER_FIELDS,
        loss_fields=("lm_weight", "distill_weight", "distill_temperature", "curriculum", "calibrate_blocks"),
        help={
            "curriculum": "SkipGPT target ramp fraction (MoD-D: none)",
            "calibrate_blocks": "θ calibration blocks (0 = none)",
        },
    )
    t.add_argument(
        "--score-blocks",
        dest="calib_blocks",
        type=positive_int,
        default=32,
        help="ShortGPT/LLM-Drop scoring blocks",
    )
    add_hidden_alias(p, "--score-blocks", "--calib-blocks")
    t.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default="nearest",
        help="static baselines remove whole units: the share nearest the target, the largest not above it, or the smallest not below it",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval-datasets",
        default="wiki-heldout,ptb",
        help="comma-separated PPL sets; the first one is summarised",
    )
    e.add_argument(
        "--eval-seq-len", type=positive_int, default=1024, help="evaluation window length (tokens)"
    )
    e.add_argument(
        "--max-windows", type=positive_int, default=None, help="evaluate the first N windows per dataset"
    )
    e.add_argument("--eval-batch-size", type=positive_int, default=2, help="evaluation windows per forward")
    e.add_argument("--speed-tokens", type=int, default=1024, help="prefill length timed (0 = no timing)")
    e.add_argument("--speed-batch", type=positive_int, default=1, help="sequences per timed prefill")
    e.add_argument("--speed-repeats", type=positive_int, default=5, help="timed prefills per method")
    e.add_argument("--tasks", default=None, help="zero-shot tasks (needs skipgpt.eval.zeroshot)")
    e.add_argument("--limit", type=positive_int, default=None, help="zero-shot examples per task")
    add_device_args(p)
    add_config_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


# -- speed ---------------------------------------------------------------------------------------
def build_spec_from_args(args):
    """The ``experiments.compare.BuildSpec`` of ``args``: compare's options, or any namespace
    (``frontier``'s) whose missing training options take the default recipe, through the same
    builders as ``train-router``."""
    from ..experiments.compare import BuildSpec
    from .train_router import loop_args_from_args, router_config_from_args, tuning_args_from_args

    return BuildSpec(
        base_spec=args.model,
        dataset=args.dataset,
        seq_len=args.seq_len,
        sparsity=args.sparsity,
        seed=args.seed,
        calib_blocks=args.calib_blocks,
        rounding=args.rounding,
        config=router_config_from_args(args),
        tuning=tuning_args_from_args(args),
        loop=loop_args_from_args(args),
    )


# -- the table ---------------------------------------------------------------------------------------
def format_compare_table(result: dict) -> str:
    """Markdown: one row per method, realised sparsity, PPL per dataset, prefill speed."""
    from ..eval.tables import markdown_table

    datasets = result["settings"]["eval_datasets"]
    cols = [
        ("method", "label"),
        ("params sparsity", lambda r: r["sparsity"]["params"]),
        ("attn / mlp skipped", lambda r: f"{r['sparsity']['attn']:.3f} / {r['sparsity']['mlp']:.3f}"),
    ]
    cols += [(f"{d} PPL", lambda r, d=d: r["ppl"].get(d, "")) for d in datasets]
    if result["settings"]["speed_tokens"]:
        cols += [
            ("prefill tok/s", lambda r: r["speed"]["prefill_tok_s"] if r.get("speed") else ""),
            ("speedup", lambda r: f"{r['speed']['speedup']:.2f}x" if r.get("speed") else ""),
        ]
    if result["settings"].get("tasks"):
        cols.append(("zero-shot mean acc", lambda r: r.get("zeroshot", {}).get("mean_acc", "")))
    s = result["settings"]
    head = (
        f"Model `{result['model']}`, target {result['target_sparsity']} ({BUDGET}; static methods rounded "
        f"'{s['rounding']}' to whole units). Sparsity realised on {datasets[0]}. PPL: {s['eval_seq_len']}-token "
        f"windows (max {s['max_windows'] or 'all'}). Router tuning: {s['max_steps']} steps × {s['batch_size']}×"
        f"{s['seq_len']} tokens of `{s['dataset']}`. Prefill: {s['speed_batch']}×{s['speed_tokens']} tokens, "
        f"median of {s['speed_repeats']}, vs dense timed alternately; {result['machine']}."
    )
    return head + "\n\n" + markdown_table(result["rows"], cols)


def _write(out: Path, result: dict) -> None:
    from ..outputs import atomic_path, write_json_atomic

    write_json_atomic(out / "compare.json", result)
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(format_compare_table(result) + "\n")


def _check_out(out: Path) -> None:
    from ..errors import SkipGPTError

    if out.exists() and (
        not out.is_dir()
        or (any(out.iterdir()) and not ((out / "models").is_dir() or (out / "compare.json").exists()))
    ):
        raise SkipGPTError(
            f"--out {out} exists and is not a compare folder; give a new folder or an earlier --output"
        )


def run(args) -> int:
    import torch

    from ..baselines.mod import topk_routing
    from ..checkpoint import is_skipgpt_dir
    from ..data import load_blocks
    from ..errors import SkipGPTError
    from ..eval.perplexity import evaluate_perplexity
    from ..eval.speed import machine_string
    from ..experiments.compare import ALL_METHODS, build_method, load_built, measure_prefill, record_target
    from ..model import SkipGPTModel
    from ..routing import StaticPolicy
    from ..specs import load_base_model

    out = Path(args.output)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise SkipGPTError(f"--methods: unknown {bad or 'empty list'}; accepted: {','.join(ALL_METHODS)}")
    datasets = [d.strip() for d in args.eval_datasets.split(",") if d.strip()]
    if not datasets:
        raise SkipGPTError("--eval-datasets is empty; give e.g. wiki-heldout,ptb")
    if args.speed_tokens < 0:
        raise SkipGPTError(f"--speed-tokens must be >= 0, got {args.speed_tokens}")
    zeroshot = None
    if args.tasks:
        try:
            from ..eval.zeroshot import evaluate_zeroshot as zeroshot
        except ImportError:
            raise SkipGPTError(
                "zero-shot evaluation is not available here (skipgpt.eval.zeroshot); drop --tasks"
            ) from None
    if is_skipgpt_dir(args.model):
        raise SkipGPTError(f"{args.model} is a routed model; compare needs the base model spec")
    _check_out(out)
    for m in methods:  # a finished folder built for another budget would silently mix budgets
        target = record_target(m, out / "models" / m)
        if target is not None and abs(float(target) - args.sparsity) > 1e-9:
            raise SkipGPTError(
                f"{out}/models/{m} was built for sparsity {target}, not {args.sparsity}; give a new --output"
            )

    base, tokenizer = load_base_model(args.model, **load_options(args))
    base.eval()
    warn_if_beyond_positions(base, args.seq_len)
    train_blocks = load_blocks(args.dataset, tokenizer, args.seq_len, max_blocks=args.max_blocks)
    warn_if_beyond_positions(base, args.eval_seq_len, "--eval-seq-len")
    evals = {d: load_blocks(d, tokenizer, args.eval_seq_len, max_blocks=args.max_windows) for d in datasets}
    speed_ids = None
    if args.speed_tokens:
        speed_ids = load_blocks(datasets[0], tokenizer, args.speed_tokens, max_blocks=args.speed_batch)
    result = {
        "model": args.model,
        "target_sparsity": args.sparsity,
        "budget": BUDGET,
        "settings": {k: getattr(args, SETTING_DESTS.get(k, k)) for k in SETTINGS}
        | {"eval_datasets": datasets},
        "machine": machine_string(),
        "rows": [],
        "complete": False,
    }

    def evaluate(
        key: str, model, routing=contextlib.nullcontext, static_sparsity=None, build=None, speed_routing=None
    ) -> None:
        """``speed_routing``: the routing timed, when it differs from the one evaluated (a static
        method timed as deployed, with no router run; the same outputs)."""
        row = {"method": key, "label": LABELS[key], "ppl": {}, "eval": {}}
        for d, blocks in evals.items():
            with routing():
                r = evaluate_perplexity(
                    model, blocks, batch_size=args.eval_batch_size, desc=f"{LABELS[key]} {d}"
                )
            r["sparsity"].pop("per_layer", None)
            row["ppl"][d] = round(r["ppl"], 4)
            row["eval"][d] = {k: r[k] for k in ("ppl", "nll", "tokens", "windows", "seq_len", "sparsity")}
        measured = row["eval"][datasets[0]]["sparsity"]
        row["sparsity"] = {
            k: round(float(v), 4) for k, v in (static_sparsity or measured).items() if k in measured
        }
        if speed_ids is not None and model is base:  # the reference itself: speedup 1 by definition
            d = measure_prefill(base, base, speed_ids, repeats=args.speed_repeats)["dense_tok_s"]
            row["speed"] = {"prefill_tok_s": d, "dense_tok_s": d, "speedup": 1.0, "tokens": speed_ids.numel()}
        elif speed_ids is not None:
            row["speed"] = measure_prefill(
                base, model, speed_ids, repeats=args.speed_repeats, routing=speed_routing or routing
            )
        if zeroshot is not None:
            with routing():
                row["zeroshot"] = zeroshot(model, tokenizer, tasks=args.tasks.split(","), limit=args.limit)
        if build:
            row["build"] = build
        result["rows"].append(row)
        _write(out, result)

    out.mkdir(parents=True, exist_ok=True)
    evaluate("dense", base)
    for method in methods:
        folder = out / "models" / method
        if record_target(method, folder) is None:
            build_method(method, folder, build_spec_from_args(args), base, tokenizer, train_blocks)
            gc.collect()
        model, record = load_built(method, folder, base)
        build = {"folder": str(folder)}
        if method in ("shortgpt", "llm-drop", "substitute"):
            key = {"shortgpt": "removed_layers", "llm-drop": "removed_modules"}.get(method, "replaced_mlps")
            build[key] = record[key]
        else:
            build["steps"] = len(record.get("history", []))
            build["threshold"] = model.state.threshold if isinstance(model, SkipGPTModel) else None
        static = record["sparsity"] if method == "shortgpt" else None
        if method == "mod":
            evaluate("mod", model, routing=lambda model=model: topk_routing(model), build=build)
            evaluate("mod-causal", model, build=build)
        elif method in ("llm-drop", "substitute"):  # timed with no constant router run
            skipped = [(int(i), "mlp") for i in record.get("replaced_mlps", [])]
            evaluate(
                method,
                model,
                build=build,
                speed_routing=lambda model=model, skipped=skipped: model.routing(
                    policy=StaticPolicy(skipped)
                ),
            )
        else:
            evaluate(method, model, static_sparsity=static, build=build)
        del model
        gc.collect()
        torch.manual_seed(args.seed)
    result["complete"] = True
    _write(out, result)
    summary = {k: result[k] for k in ("model", "target_sparsity", "budget", "machine")} | {
        "output": str(out),
        "out": str(out),  # the key before the renames, kept for one release
        "rows": [
            {k: r[k] for k in ("method", "label", "sparsity", "ppl") if k in r}
            | ({"speedup": r["speed"]["speedup"]} if r.get("speed") else {})
            for r in result["rows"]
        ],
    }
    emit(args, summary, format_compare_table(result) + f"\n\nwritten to {out}/compare.md and compare.json")
    return 0
