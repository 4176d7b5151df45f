"""LoRA recovery table: dense, dense + LoRA, SkipGPT-RT, SkipGPT-RT + LoRA, SkipGPT-Joint.

Stage 2 is run twice on the same routers: with the command's loss (LM, plus self-distillation
at ``--stage2-distill-weight``) and with the other choice of self-distillation (KL to the dense
base model on or off): SkipGPT-Joint trains with the stage-1 loss, distillation included, so the
pair shows whether that alone explains a gap between Joint and the two-stage path.

Every stage gets the same token budget (steps × batch × seq-len tokens of calib): stage 1
(router tuning) for SkipGPT-RT, stage 2 (LoRA, routers frozen) for SkipGPT-RT + LoRA and for
dense + LoRA, and stage 1 + stage 2 together for SkipGPT-Joint (routers and LoRA from scratch
in one run). The settings are those of the commands (`skipgpt train-router`, `skipgpt
finetune-lora [--dense | --joint]`) at their defaults. Each row reports PPL on wiki-heldout and
PTB, the routers' realised module / parameter sparsity (deterministic routing at the calibrated
θ, pooled over both evaluation sets) and wall time. Writes OUT/lora.json and OUT/lora.md.

    python benchmarks/lora_table.py --routers runs/demo/routers --steps 150 --out runs/lora
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from skipgpt import SkipGPTModel, get_skipgpt_model
from skipgpt.cli import build_parser
from skipgpt.commands.finetune_lora import lora_args_from_args
from skipgpt.commands.train_router import loop_args_from_args, router_config_from_args, tuning_args_from_args
from skipgpt.config import CONFIG_NAME, SkipGPTConfig
from skipgpt.data import load_blocks
from skipgpt.errors import SkipGPTError
from skipgpt.eval.perplexity import evaluate_perplexity
from skipgpt.eval.tables import markdown_table
from skipgpt.loading import is_skipgpt_dir
from skipgpt.model import ROUTERS_NAME, resolve_base_spec
from skipgpt.outputs import atomic_path, write_json_atomic
from skipgpt.specs import load_base_model
from skipgpt.train.lora import finetune_lora, train_joint
from skipgpt.train.router_tuning import RouterTuningArgs, train_routers

EVALSETS = ("wiki-heldout", "ptb")
DEFAULT_MODEL = "smollm2-135m"
TRAIN_DATA = "calib"


def _command_args(argv: list[str]) -> argparse.Namespace:
    """The command's parsed arguments: the defaults the CLI would use."""
    return build_parser().parse_args(argv)


def _routers_source(folder: str) -> dict:
    if not is_skipgpt_dir(folder) or not (Path(folder) / ROUTERS_NAME).exists():
        raise SkipGPTError(f"--routers {folder} is not a `skipgpt train-router` output folder")
    record = SkipGPTConfig.read_json(Path(folder) / CONFIG_NAME)
    if record.get("router_config") is None or (Path(folder) / "adapter").is_dir():
        raise SkipGPTError(f"--routers {folder} must be a stage-1 folder (routers, no LoRA adapter)")
    return record


def _stage1_tokens(meta: dict) -> tuple[int, str]:
    """Tokens a stage-1 folder was trained on (from its metadata), and how they were counted."""
    loop, seq_len = meta.get("loop") or {}, meta.get("seq_len")
    if not (loop.get("max_steps") and loop.get("batch_size") and seq_len):
        return 0, "unknown (no training metadata)"
    batch = loop["batch_size"] * loop.get("grad_accum", 1)
    tokens = loop["max_steps"] * batch * seq_len
    return tokens, f"{loop['max_steps']} steps × {batch}×{seq_len} {meta.get('dataset', '?')} tokens"


def _loss_text(lora) -> str:
    """The stage-2 loss in words, e.g. 'LM + KD' or 'LM'."""
    terms = []
    if lora.lm_weight > 0:
        terms.append("LM" if lora.lm_weight == 1 else f"{lora.lm_weight:g}·LM")
    if lora.distill_weight > 0:
        terms.append("KD" if lora.distill_weight == 1 else f"{lora.distill_weight:g}·KD")
    return " + ".join(terms)


def _evaluate(name: str, model, evalsets: dict[str, torch.Tensor]) -> dict:
    """PPL per set; sparsity pooled over both sets (each set's counts weighted by its tokens)."""
    t0 = time.time()
    row: dict = {"sparsity_per_set": {}}
    pooled = {k: 0.0 for k in ("module", "attn", "mlp", "params")}
    tokens = 0
    for d, blocks in evalsets.items():
        r = evaluate_perplexity(model, blocks, desc=f"{name} {d}")
        row[f"{d} ppl"] = r["ppl"]
        s = {k: r["sparsity"][k] for k in pooled}
        row["sparsity_per_set"][d] = s
        for k in pooled:
            pooled[k] += s[k] * r["tokens"]
        tokens += r["tokens"]
    row.update({k: v / max(tokens, 1) for k, v in pooled.items()})
    row["threshold"] = model.state.threshold if isinstance(model, SkipGPTModel) else None
    row["eval s"] = time.time() - t0
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default=None, help=f"model spec (default: the base of --routers, else {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--routers",
        default=None,
        help="stage-1 folder (`skipgpt train-router` output) for the SkipGPT-RT rows; "
        "default: train routers here with the same budget",
    )
    p.add_argument(
        "--target", type=float, default=None, help="target sparsity (default: that of --routers, else 0.25)"
    )
    p.add_argument(
        "--stage2-distill-weight",
        type=float,
        default=None,
        help="self-distillation weight of the first stage-2 row and of dense + LoRA (default: the "
        "command's); the second stage-2 row flips it between 0 and 1",
    )
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per stage")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--eval-seq-len", type=int, default=1024)
    p.add_argument("--out", default="runs/lora")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except SkipGPTError as e:
        raise SystemExit(f"error: {e}") from None


def _run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    record = _routers_source(args.routers) if args.routers else None
    spec = args.model
    if record is not None:
        routers_base = resolve_base_spec(record, args.routers)
        if spec is not None and spec != routers_base:
            raise SkipGPTError(
                f"--model {spec} differs from the base model of --routers ({routers_base}); "
                "drop --model or give routers trained on it"
            )
        spec = routers_base
    spec = spec or DEFAULT_MODEL

    budget = f"--max-steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len}".split()
    common = ["--model", spec, "--output", str(out), *budget]
    stage1 = _command_args(["train-router", *common, "--target-sparsity", str(args.target or 0.25)])
    kd = (
        []
        if args.stage2_distill_weight is None
        else ["--stage2-distill-weight", str(args.stage2_distill_weight)]
    )
    stage2 = _command_args(["finetune-lora", *common, *kd])
    if record is not None:  # Joint and the given routers share their router config and stage-1 loss
        config = dataclasses.replace(SkipGPTConfig.from_dict(record["router_config"]), threshold=0.5)
        if args.target is not None and args.target != config.target_sparsity:
            raise SkipGPTError(
                f"--target {args.target} differs from the target of --routers ({config.target_sparsity})"
            )
        tuning_meta = (record.get("metadata") or {}).get("router_tuning")
        tuning = RouterTuningArgs(**tuning_meta) if tuning_meta else tuning_args_from_args(stage1)
    else:
        config, tuning = router_config_from_args(stage1), tuning_args_from_args(stage1)
    loop1, loop2, lora = loop_args_from_args(stage1), loop_args_from_args(stage2), lora_args_from_args(stage2)
    stage_tokens = args.steps * args.batch_size * args.seq_len
    if record is not None:
        s1_tokens, s1_budget = _stage1_tokens(record.get("metadata") or {})
        s1_text = f"routers from {args.routers}: {s1_budget}"
    else:
        s1_tokens, s1_budget = stage_tokens, f"{args.steps} steps × {args.batch_size}×{args.seq_len}"
        s1_text = f"{s1_budget} {TRAIN_DATA} tokens"
    joint_steps = args.steps + math.ceil((s1_tokens or stage_tokens) / (args.batch_size * args.seq_len))
    loop_joint = dataclasses.replace(loop2, max_steps=joint_steps)

    base, tok = load_base_model(spec)
    base.eval()
    train = load_blocks(TRAIN_DATA, tok, args.seq_len)
    evalsets = {d: load_blocks(d, tok, args.eval_seq_len, max_blocks=args.eval_windows) for d in EVALSETS}
    meta = {"dataset": TRAIN_DATA, "seq_len": args.seq_len, "blocks": int(train.shape[0]), "source": spec}
    rows: list[dict] = []

    def add(name: str, training: str, model, train_s: float | None, tokens: int) -> None:
        row = {"model": name, "training": training, "train tokens": tokens, "train s": train_s}
        row.update(_evaluate(name, model, evalsets))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sparsity_per_set"}), flush=True)

    def timed(fn, *fn_args, **fn_kwargs) -> float:
        torch.manual_seed(0)
        t0 = time.time()
        fn(*fn_args, **fn_kwargs)
        return time.time() - t0

    # 1. dense
    add("dense", "none", base, None, 0)

    # 2. dense + LoRA (the control: what LoRA alone buys)
    model = copy.deepcopy(base)
    wall = timed(
        finetune_lora,
        model,
        train,
        out / "dense_lora",
        loop2,
        lora,
        base_spec=spec,
        overwrite=True,
        metadata=meta,
    )
    add("dense + LoRA", f"LoRA {args.steps} steps, {_loss_text(lora)}", model, wall, stage_tokens)

    # 3. SkipGPT-RT (stage 1): the given routers, or routers trained here
    if record is not None:
        rt_dir, wall = Path(args.routers), None
        model = SkipGPTModel.from_pretrained(rt_dir, base_model=copy.deepcopy(base))
        rt_training = f"routers (given: {s1_budget})"
    else:
        rt_dir = out / "routers"
        model = get_skipgpt_model(copy.deepcopy(base), config, base_spec=spec)
        wall = timed(train_routers, model, train, rt_dir, loop1, tuning, overwrite=True, metadata=meta)
        rt_training = f"routers {args.steps} steps"
    add("SkipGPT-RT", rt_training, model, wall, s1_tokens)

    # 4. SkipGPT-RT + LoRA (stage 2, routers frozen): the default loss, then the other choice
    # of self-distillation (the ablation that justifies the default)
    other = dataclasses.replace(lora, distill_weight=0.0 if lora.distill_weight > 0 else 1.0)
    other_name = "SkipGPT-RT + LoRA, LM only" if lora.distill_weight > 0 else "SkipGPT-RT + LoRA, + KD"
    for name, folder, stage2_lora in (
        ("SkipGPT-RT + LoRA", "rt_lora", lora),
        (other_name, "rt_lora_alt", other),
    ):
        model = SkipGPTModel.from_pretrained(rt_dir, base_model=copy.deepcopy(base))
        wall = timed(
            finetune_lora, model, train, out / folder, loop2, stage2_lora, overwrite=True, metadata=meta
        )
        training = f"{rt_training} + LoRA {args.steps} steps, {_loss_text(stage2_lora)}"
        add(name, training, model, wall, s1_tokens + stage_tokens)

    # 5. SkipGPT-Joint: routers and LoRA from scratch, stage-1 + stage-2 budget in one run
    model = get_skipgpt_model(copy.deepcopy(base), config, base_spec=spec)
    joint_dir = out / "joint"
    wall = timed(
        train_joint,
        model,
        train,
        joint_dir,
        loop_joint,
        lora,
        tuning,
        router_lr=stage2.router_lr,
        overwrite=True,
        metadata=meta,
    )
    joint_tokens = joint_steps * args.batch_size * args.seq_len
    add("SkipGPT-Joint", f"routers + LoRA {joint_steps} steps", model, wall, joint_tokens)
    del model

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    settings = (
        f"{spec}, target sparsity {config.target_sparsity} ({config.budget}). Token budget per stage: "
        f"{args.steps} steps × {args.batch_size}×{args.seq_len} = {stage_tokens} {TRAIN_DATA} tokens "
        f"(stage 1: {s1_text}); SkipGPT-Joint: {joint_steps} steps = stage 1 + stage 2. "
        f"Stage 1 lr {loop1.lr} {loop1.lr_scheduler}; LoRA r={lora.r} α={lora.lora_alpha} on {','.join(lora.targets)}, "
        f"lr {loop2.lr} {loop2.lr_scheduler} (warm-up {loop2.warmup_ratio}), stage-2 routing {lora.routing}, "
        f"stage-2 loss {_loss_text(lora)} (KD: KL(dense base model ‖ student), T={lora.distill_temperature:g}); "
        f"Joint router lr {stage2.router_lr}. PPL on the first {args.eval_windows} windows of {args.eval_seq_len} "
        f"tokens; sparsity: deterministic routing at the calibrated θ, pooled over both sets. "
        f"train s: training done by this run (SkipGPT-RT + LoRA: stage 2 only). {machine}"
    )
    table = markdown_table(
        rows,
        [
            ("model", "model"),
            ("training", "training"),
            ("train tokens", "train tokens"),
            ("module sp.", "module"),
            ("param sp.", "params"),
            ("θ", lambda r: "" if r["threshold"] is None else r["threshold"]),
            ("wiki-heldout PPL", "wiki-heldout ppl"),
            ("PTB PPL", "ptb ppl"),
            ("train s", lambda r: "" if r["train s"] is None else r["train s"]),
            ("eval s", "eval s"),
        ],
    )
    result = {"rows": rows, "settings": settings, "stage_tokens": stage_tokens, "joint_steps": joint_steps}
    write_json_atomic(out / "lora.json", result)
    with atomic_path(out / "lora.md") as tmp:
        tmp.write_text(table + "\n\n" + settings + "\n")
    print(table + "\n\n" + settings)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
