"""Router-tuning recipe ablation on one model at one target, with a fixed token budget.

Each variant trains routers from scratch with the same data, steps and batch, then reports
realised module/attn/mlp/parameter sparsity (deterministic routing, calibrated θ unless
--no-calibrate), PTB and wiki-heldout perplexity, and wall time. Writes OUT/recipe.{json,md}.

    python benchmarks/recipe.py --steps 150 --batch-size 8 --out runs/recipe
    python benchmarks/recipe.py --list                  # the variants (and which are stored in OUT)
    python benchmarks/recipe.py --variants dense-init+distill+curriculum --steps 300 \
        --curve-every 50 --out runs/recipe-curve        # one variant with its PPL-against-steps curve

With --curve-every N, every N training steps the routers are evaluated as they stand (θ
calibrated on the same blocks as at the end, then restored; training is not perturbed): the
row gains a "curve" list and OUT/<variant>.curve.png plots PPL against steps.

Resumable, so the grid can be spread over several sessions: every finished variant is stored
in OUT/variants/<name>.json (atomically) with its row and the settings that produced it, and
the dense row in OUT/variants/dense.json. A rerun with the same settings skips stored variants
without loading the model or re-evaluating anything; a variant interrupted during training
continues from its last checkpoint (OUT/<name>/checkpoint, every --save-every steps; needs the
same settings and --save-every). Each run rebuilds OUT/recipe.{md,json} from every stored row
made with the current settings, whichever session made it (`--variants` picks what this run
trains, not what the table shows). To redo a variant, delete its OUT/variants/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from skipgpt import SkipGPTConfig, get_skipgpt_model
from skipgpt.errors import SkipGPTError
from skipgpt.eval.perplexity import DENSE_SPARSITY, evaluate_perplexity
from skipgpt.eval.tables import markdown_table
from skipgpt.outputs import atomic_path, write_json_atomic
from skipgpt.train.loop import CHECKPOINT_DIR, LoopArgs, load_trainable
from skipgpt.train.recipes import RECIPES
from skipgpt.train.router_tuning import train_routers

PAPER_LOSS = RECIPES["paper"].tuning

# name -> (router config changes, stage-1 loss changes), relative to SkipGPTConfig() and the
# paper's loss (RECIPES["paper"].tuning: LM only, fixed target; the default recipe's loss is
# "dense-init+distill+curriculum")
VARIANTS = {
    "paper": ({"router_init": "paper"}, {}),
    "dense-init": ({}, {}),
    "dense-init+curriculum": ({}, {"curriculum": 0.3}),
    "dense-init+distill": ({}, {"distill_weight": 1.0}),
    "dense-init+distill+curriculum": ({}, {"distill_weight": 1.0, "curriculum": 0.3}),
    "distill-only+curriculum": ({}, {"distill_weight": 1.0, "lm_weight": 0.0, "curriculum": 0.3}),
    # (names have no commas: --variants is a comma-separated list)
    "distill+curriculum+post-attn-mlp-router": (
        {"mlp_router_input": "post_attention"},
        {"distill_weight": 1.0, "curriculum": 0.3},
    ),
}
assert not any("," in name for name in VARIANTS)
EVAL_SETS = ("wiki-heldout", "ptb")  # PTB last: the table's sparsity columns are PTB's
SPARSITY = tuple(DENSE_SPARSITY)  # module, attn, mlp, params, params_net
CALIBRATE_BLOCKS = 16
SEED = 0
COLUMNS = [
    ("variant", "variant"),
    ("module sp.", "module"),
    ("attn", "attn"),
    ("mlp", "mlp"),
    ("param sp.", "params"),
    ("θ", "threshold"),
    ("wiki-heldout PPL", "wiki-heldout ppl"),
    ("PTB PPL", "ptb ppl"),
    ("train s", "train s"),
]


def slug(name: str) -> str:
    """File/folder name of a variant (also the name of its routers folder under OUT)."""
    return name.replace(" ", "_").replace(",", "")


def _normalise(obj):
    return json.loads(json.dumps(obj))  # tuples -> lists, so stored and fresh settings compare equal


def dense_settings(args) -> dict:
    return _normalise(
        {
            "model": args.model,
            "eval_sets": EVAL_SETS,
            "eval_windows": args.eval_windows,
            "eval_seq_len": args.eval_seq_len,
        }
    )


def variant_settings(args, name: str) -> dict:
    """Everything that determines a variant's row (not --save-every, which only sets checkpoints)."""
    config_changes, tuning_changes = VARIANTS[name]
    return _normalise(
        {
            "variant": name,
            "config_changes": config_changes,
            "tuning_changes": tuning_changes,
            **dense_settings(args),
            "target": args.target,
            "budget": args.budget,
            "router_hidden": args.router_hidden,
            "train_data": "calib",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "seed": SEED,
            "calibrate_blocks": 0 if args.no_calibrate else CALIBRATE_BLOCKS,
            **({"curve_every": args.curve_every} if args.curve_every else {}),
        }
    )


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def load_stored(path: Path, settings: dict) -> tuple[str, dict | None]:
    """('stored', row) when ``path`` holds a row made with ``settings``; else (why not, None)."""
    if not path.exists():
        return "not run", None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return "unreadable", None
    if record.get("settings") != settings or "row" not in record:
        return "made with other settings", None
    return "stored", record["row"]


def store(path: Path, settings: dict, row: dict) -> None:
    write_json_atomic(
        path, {"settings": settings, "row": row, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    )


class Resources:
    """Model, tokenizer and data, loaded on first use only (a fully stored run loads nothing)."""

    def __init__(self, args):
        self.args = args
        self._base = self._tok = self._train = self._evalsets = None
        self.dense_row: dict = {}

    def base(self):
        if self._base is None:
            from skipgpt.specs import load_base_model

            self._base, self._tok = load_base_model(self.args.model)
        return self._base

    def set_base(self, base) -> None:
        self._base = base

    def train(self) -> torch.Tensor:
        if self._train is None:
            from skipgpt.data import load_blocks

            self.base()
            self._train = load_blocks("calib", self._tok, self.args.seq_len)
        return self._train

    def evalsets(self) -> dict[str, torch.Tensor]:
        if self._evalsets is None:
            from skipgpt.data import load_blocks

            self.base()
            a = self.args
            self._evalsets = {
                d: load_blocks(d, self._tok, a.eval_seq_len, max_blocks=a.eval_windows) for d in EVAL_SETS
            }
        return self._evalsets


def run_dense(res: Resources) -> dict:
    t0 = time.time()
    row = {"variant": "dense", **DENSE_SPARSITY}
    for d, blocks in res.evalsets().items():
        row[f"{d} ppl"] = evaluate_perplexity(res.base(), blocks, desc=f"dense {d}")["ppl"]
    row["eval s"] = time.time() - t0
    row["machine"] = machine()
    return row


def evaluate_routed(model, res: Resources, name: str | None = None) -> dict:
    """PPL on every eval set and PTB's sparsity, as the table reports them (progress bars when named)."""
    point, by_dataset = {}, {}
    for d, blocks in res.evalsets().items():
        r = evaluate_perplexity(model, blocks, desc=f"{name} {d}", progress=name is not None)
        point[f"{d} ppl"] = r["ppl"]
        by_dataset[d] = {k: r["sparsity"][k] for k in SPARSITY}
    point.update(by_dataset[EVAL_SETS[-1]])
    point["sparsity by dataset"] = by_dataset
    return point


def curve_point(model, res: Resources, calibrate_blocks: int, step: int) -> dict:
    """The routers as they stand at ``step``: θ calibrated like the final model's, PPL, sparsity.

    Leaves the model as it found it (training mode, θ), so the run goes on unchanged.
    """
    from skipgpt.calibration import calibrate_threshold

    theta_before, t0 = model.state.threshold, time.time()
    model.eval()
    try:
        if calibrate_blocks:
            calibrate_threshold(model, res.train()[:calibrate_blocks], model.skipgpt_config.target_sparsity)
        point = {"step": step, "threshold": model.state.threshold, **evaluate_routed(model, res)}
    finally:
        model.state.threshold = model.skipgpt_config.threshold = theta_before
        model.train()
    point["eval s"] = time.time() - t0
    print(
        f"[curve] step {step}: "
        + json.dumps({k: round(v, 4) for k, v in point.items() if isinstance(v, float | int)}),
        flush=True,
    )
    return point


def plot_curve(path: Path, name: str, curve: list[dict], dense: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for d, colour in zip(EVAL_SETS, ("tab:blue", "tab:orange"), strict=True):
        ax.plot([p["step"] for p in curve], [p[f"{d} ppl"] for p in curve], "o-", color=colour, label=d)
        ax.axhline(dense[f"{d} ppl"], color=colour, ls="--", lw=1, label=f"{d} dense")
    ax.set(xlabel="router-tuning step", ylabel="perplexity", yscale="log", title=name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_variant(res: Resources, name: str, settings: dict, out: Path, save_every: int) -> dict:
    """Train (or continue training) one variant's routers, evaluate them, return its row."""
    args = res.args
    config_changes, tuning_changes = VARIANTS[name]
    routers_dir = out / slug(name)
    progress_path = out / "variants" / f"{slug(name)}.progress.json"
    loop = LoopArgs(
        max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=SEED, save_every=save_every
    )
    tuning = replace(PAPER_LOSS, calibrate_blocks=settings["calibrate_blocks"], **tuning_changes)
    run_settings = {**settings, "save_every": save_every}

    # an interrupted run of the same settings continues from its last checkpoint
    elapsed_before, resume, curve, progress_step = 0.0, False, [], 0
    if (routers_dir / CHECKPOINT_DIR / "trainer_state.json").exists() and progress_path.exists():
        try:
            progress = json.loads(progress_path.read_text())
        except (json.JSONDecodeError, OSError):
            progress = {}
        if progress.get("settings") == run_settings:
            resume, elapsed_before = True, float(progress.get("elapsed_s", 0.0))
            curve, progress_step = list(progress.get("curve", [])), int(progress.get("step", 0))

    def make_model():
        config = SkipGPTConfig(
            target_sparsity=args.target,
            budget=args.budget,
            router_hidden=args.router_hidden,
            **config_changes,
        )
        return get_skipgpt_model(res.base(), config, base_spec=args.model)

    train = res.train()
    model = make_model()
    torch.manual_seed(SEED)
    t0 = time.time()

    curve_s = 0.0  # evaluation time inside the training loop, not counted as training time

    def on_step(step: int, metrics: dict) -> None:  # the train loop has just checkpointed this step
        nonlocal curve_s
        done = step + 1
        if args.curve_every and done % args.curve_every == 0 and done < args.steps:  # the end is the row
            curve.append(curve_point(model, res, settings["calibrate_blocks"], done))
            curve_s += curve[-1]["eval s"]
        if done % save_every == 0 or done == args.steps:
            elapsed = elapsed_before + time.time() - t0 - curve_s
            write_json_atomic(
                progress_path, {"settings": run_settings, "step": done, "elapsed_s": elapsed, "curve": curve}
            )

    resumed_at = None
    if resume:
        resumed_at = json.loads((routers_dir / CHECKPOINT_DIR / "trainer_state.json").read_text())["step"]
        print(f"[{name}] continuing from its checkpoint at step {resumed_at}/{args.steps}", flush=True)
        if progress_step < resumed_at:  # stopped between a checkpoint and its progress record
            elapsed_before *= resumed_at / max(progress_step, 1)  # the lost steps at the mean pace so far
        missing_point = args.curve_every and resumed_at % args.curve_every == 0 and resumed_at < args.steps
        if missing_point and all(p["step"] != resumed_at for p in curve):
            load_trainable(
                routers_dir / CHECKPOINT_DIR, model.router_state_dict()
            )  # the point the stop skipped
            curve.append(curve_point(model, res, settings["calibrate_blocks"], resumed_at))
    else:
        write_json_atomic(progress_path, {"settings": run_settings, "step": 0, "elapsed_s": 0.0})
    try:
        result = train_routers(
            model, train, routers_dir, loop, tuning, resume=resume, overwrite=True, on_step=on_step
        )
    except SkipGPTError as e:
        if not resume:
            raise
        print(f"[{name}] cannot continue ({e}); training from scratch", flush=True)
        res.set_base(model.unwrap())
        model, resumed_at, elapsed_before, curve[:] = make_model(), None, 0.0, []
        t0, curve_s = time.time(), 0.0
        result = train_routers(model, train, routers_dir, loop, tuning, overwrite=True, on_step=on_step)
    train_s = elapsed_before + time.time() - t0 - curve_s

    t1 = time.time()
    row = {"variant": name, "train s": train_s, "final lm": result["history"][-1].get("lm")}
    row.update(evaluate_routed(model, res, name))  # the table's sparsity: PTB's
    row["threshold"] = model.state.threshold
    row["eval s"] = time.time() - t1
    row["resumed at step"] = resumed_at
    row["machine"] = machine()
    if args.curve_every:
        row["curve"] = (
            [*curve, {"step": args.steps, **{k: row[k] for k in curve[0] if k in row}}] if curve else []
        )
        if row["curve"]:
            plot_curve(out / f"{slug(name)}.curve.png", name, row["curve"], res.dense_row)
    res.set_base(model.unwrap())
    return row


def build_table(args, out: Path, dense: dict, rows: list[dict]) -> tuple[str, str]:
    machines = sorted({r["machine"] for r in [dense, *rows] if r.get("machine")}) or [machine()]
    settings = (
        f"{args.model}, target {args.target} ({args.budget}), {args.steps} steps × {args.batch_size}×{args.seq_len} "
        f"calib tokens per variant, lr {args.lr}; PPL on the first {args.eval_windows} windows of "
        f"{args.eval_seq_len} tokens; sparsity measured on PTB; θ {'0.5' if args.no_calibrate else 'calibrated'}; "
        f"{'; '.join(machines)}"
    )
    table = markdown_table([dense, *rows], COLUMNS)
    for row in rows:  # variants trained with --curve-every: their PPL against steps
        if row.get("curve"):
            curve_table = markdown_table(row["curve"], [("step", "step"), *COLUMNS[1:-1]])
            table += (
                f"\n\nPPL against router-tuning steps, {row['variant']} (θ calibrated at each point; "
                f"plot: {slug(row['variant'])}.curve.png):\n\n{curve_table}"
            )
    write_json_atomic(out / "recipe.json", {"rows": [dense, *rows], "settings": settings})
    with atomic_path(out / "recipe.md") as tmp:
        tmp.write_text(table + "\n\n" + settings + "\n")
    return table, settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--budget", choices=["modules", "params"], default="modules")
    p.add_argument(
        "--router-hidden",
        type=int,
        default=0,
        help="router width (0, the default router: linear; the tables before 2026-12-07 used 144 = d/4)",
    )
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    p.add_argument(
        "--no-calibrate", action="store_true", help="keep θ = 0.5 instead of calibrating it to the target"
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=10,
        help="checkpoint a variant's training every N steps (resume point)",
    )
    p.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="also evaluate the routers every N training steps (PPL-against-steps curve; 0 = off)",
    )
    p.add_argument(
        "--list", action="store_true", help="print the variants (and their state in --out), then exit"
    )
    p.add_argument("--out", default="runs/recipe")
    args = p.parse_args(argv)
    args.names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in args.names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; accepted: {list(VARIANTS)}")
    if args.save_every < 1:
        p.error("--save-every must be >= 1")
    if args.curve_every < 0:
        p.error("--curve-every must be >= 0 (0 = no curve)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    stored_dir = out / "variants"

    if args.list:
        for name, (config_changes, tuning_changes) in VARIANTS.items():
            state, _ = load_stored(stored_dir / f"{slug(name)}.json", variant_settings(args, name))
            print(
                f"{name}: router config {json.dumps(config_changes)}, loss {json.dumps(tuning_changes)} "
                f"[{state}; {stored_dir}]"
            )
        return 0

    res = Resources(args)
    state, dense = load_stored(stored_dir / "dense.json", dense_settings(args))
    if dense is None:
        dense = run_dense(res)
        store(stored_dir / "dense.json", dense_settings(args), dense)
    else:
        print("dense: stored with these settings, skipped", flush=True)
    res.dense_row = dense

    for name in args.names:
        settings = variant_settings(args, name)
        path = stored_dir / f"{slug(name)}.json"
        state, row = load_stored(path, settings)
        if row is not None:
            print(f"{name}: stored with these settings in {path}, skipped", flush=True)
            continue
        if state != "not run":
            print(f"{name}: the row in {path} is {state}; running it again", flush=True)
        row = run_variant(res, name, settings, out, args.save_every)
        store(path, settings, row)
        (stored_dir / f"{slug(name)}.progress.json").unlink(missing_ok=True)
        print(json.dumps(row), flush=True)

    rows, left_out = [], []
    for name in VARIANTS:  # every stored row of these settings, in the grid's order
        state, row = load_stored(stored_dir / f"{slug(name)}.json", variant_settings(args, name))
        if row is not None:
            rows.append(row)
        elif state != "not run":
            left_out.append(f"{name} ({state})")
    table, settings = build_table(args, out, dense, rows)
    print(table + "\n\n" + settings)
    missing = [n for n in VARIANTS if n not in {r["variant"] for r in rows}]
    if missing:
        print(f"\nnot in the table yet: {', '.join(missing)}")
    if left_out:
        print(f"stored with other settings (not in the table): {', '.join(left_out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
