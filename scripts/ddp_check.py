"""Multi-process router tuning == one process with the same global batch (2 CPU processes, gloo).

Trains the same routers three ways with ``skipgpt train-router`` and prints the curves side by side:

* ``1p  B``      one process, batch B;
* ``1p  B/N×N``  one process, batch B/N with N gradient-accumulation micro-steps;
* ``Np  B/N``    N processes (``accelerate launch --multi_gpu``; gloo when there is no GPU),
  batch B/N each, so the global batch is B.

The loop shards every global batch over ranks and seeds each shard's Gumbel noise by its global
shard index, so ``Np B/N`` must equal ``1p B/N×N`` up to float summation order (this proves the
gradient all-reduce: without it, ranks would drift apart and the curve would differ), and must
match ``1p B`` within Gumbel-noise tolerance (same blocks, other noise draws). The loop also
checks at every checkpoint that all ranks hold bit-identical routers (``rank_divergence`` = 0).

    python scripts/ddp_check.py                       # random:llama, 20 steps, B = 8 (~2 min on 2 cores)
    python scripts/ddp_check.py --model smollm2-135m --steps 10 --seq-len 128 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["run_check", "format_curves", "train_args"]

EXACT_TOL = 1e-4  # Np B/N vs 1p B/N×N: the same computation, summed in another order
NOISE_TOL = 0.05  # Np B/N vs 1p B: mean |Δ sparsity| over the run (other Gumbel draws)


def train_args(
    model: str,
    dataset: str,
    seq_len: int,
    max_blocks: int,
    steps: int,
    lr: float,
    batch: int,
    accum: int,
    out,
):
    return [
        "train-router",
        "--model", model,
        "--dataset", dataset,
        "--seq-len", str(seq_len),
        "--max-blocks", str(max_blocks),
        "--max-steps", str(steps),
        "--lr", str(lr),
        "--batch-size", str(batch),
        "--grad-accum", str(accum),
        "--save-every", str(steps),
        "--calibrate-blocks", "0",
        "--keep-checkpoint",  # _read takes the history and rank divergence from checkpoint/
        "--output", str(out),
        "--json",
    ]  # fmt: skip


def _launch(processes: int, cli_args: list[str]) -> None:
    """Run ``skipgpt`` under ``accelerate launch`` (torchrun underneath) with ``processes`` ranks."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "skipgpt.cli", *cli_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def _run_here(cli_args: list[str]) -> None:
    import contextlib

    from skipgpt.cli import main

    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 - the summary line only
        code = main(cli_args)
    if code != 0:
        raise RuntimeError(f"skipgpt {' '.join(cli_args)} failed")


def _read(out: Path) -> dict:
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    from safetensors.torch import load_file

    return {
        "processes": state["processes"],
        "rank_divergence": state["rank_divergence"],
        "loss": [h["loss"] for h in state["history"]],
        "sparsity": [h["sparsity"] for h in state["history"]],
        "routers": load_file(str(out / "routers.safetensors")),
    }


def run_check(
    model: str = "random:llama",
    dataset: str = "calib",
    seq_len: int = 32,
    max_blocks: int = 64,
    steps: int = 20,
    batch_size: int = 8,
    processes: int = 2,
    workdir: str | Path | None = None,
    lr: float = 2e-2,
) -> dict:
    """Train the three ways; return the curves and the comparisons (see the module docstring)."""
    if batch_size % processes:
        raise ValueError(f"batch size {batch_size} must be divisible by {processes} processes")
    shard = batch_size // processes
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        common = dict(
            model=model, dataset=dataset, seq_len=seq_len, max_blocks=max_blocks, steps=steps, lr=lr
        )
        runs = {
            f"1p B={batch_size}": (1, train_args(**common, batch=batch_size, accum=1, out=root / "one")),
            f"1p B={shard}x{processes}": (
                1,
                train_args(**common, batch=shard, accum=processes, out=root / "accum"),
            ),
            f"{processes}p B={shard}": (
                processes,
                train_args(**common, batch=shard, accum=1, out=root / "multi"),
            ),
        }
        curves = {}
        for name, (n, cli_args) in runs.items():
            (_launch(n, cli_args) if n > 1 else _run_here(cli_args))
            curves[name] = _read(Path(cli_args[cli_args.index("--output") + 1]))
    one, accum, multi = curves.values()
    diff = lambda a, b, k: [abs(x - y) for x, y in zip(a[k], b[k], strict=True)]  # noqa: E731
    result = {
        "command": "accelerate launch --multi_gpu --num_processes "
        f"{processes} -m skipgpt.cli " + " ".join(runs[f"{processes}p B={shard}"][1][:-3]) + " --output DIR",
        "curves": {k: {"loss": v["loss"], "sparsity": v["sparsity"]} for k, v in curves.items()},
        "processes": multi["processes"],
        "rank_divergence": multi["rank_divergence"],
        "max_abs_diff_vs_accum": {
            "loss": max(diff(multi, accum, "loss")),
            "sparsity": max(diff(multi, accum, "sparsity")),
            "routers": max(
                float((multi["routers"][k] - accum["routers"][k]).abs().max()) for k in multi["routers"]
            ),
        },
        "mean_abs_diff_vs_one": {
            "loss": sum(diff(multi, one, "loss")) / steps,
            "sparsity": sum(diff(multi, one, "sparsity")) / steps,
        },
    }
    exact = result["max_abs_diff_vs_accum"]
    result["passed"] = (
        result["processes"] == processes
        and result["rank_divergence"] == 0.0
        and max(exact.values()) <= EXACT_TOL
        and result["mean_abs_diff_vs_one"]["sparsity"] <= NOISE_TOL
    )
    return result


def format_curves(result: dict) -> str:
    """Markdown: one row per step, loss and realised sparsity of every run side by side."""
    names = list(result["curves"])
    head = (
        "| step | "
        + " | ".join(f"loss {n}" for n in names)
        + " | "
        + " | ".join(f"sparsity {n}" for n in names)
        + " |"
    )
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    steps = len(result["curves"][names[0]]["loss"])
    for s in range(steps):
        losses = " | ".join(f"{result['curves'][n]['loss'][s]:.4f}" for n in names)
        spars = " | ".join(f"{result['curves'][n]['sparsity'][s]:.4f}" for n in names)
        lines.append(f"| {s} | {losses} | {spars} |")
    exact, noisy = result["max_abs_diff_vs_accum"], result["mean_abs_diff_vs_one"]
    lines += [
        "",
        f"processes: {result['processes']}; routers identical across ranks: "
        f"{result['rank_divergence'] == 0.0} (checksum difference {result['rank_divergence']})",
        f"{names[2]} vs {names[1]} (same noise): max |Δloss| {exact['loss']:.2e}, "
        f"max |Δsparsity| {exact['sparsity']:.2e}, max |Δrouter weight| {exact['routers']:.2e}",
        f"{names[2]} vs {names[0]} (other Gumbel draws): mean |Δloss| {noisy['loss']:.4f}, "
        f"mean |Δsparsity| {noisy['sparsity']:.4f}",
        f"passed: {result['passed']}",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama")
    p.add_argument("--dataset", default="calib")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--max-blocks", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="global batch B")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument(
        "--lr", type=float, default=2e-2, help="high enough for the sparsity to move in a short run"
    )
    p.add_argument("--workdir", default=None, help="keep the three output folders here")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    result = run_check(
        a.model, a.dataset, a.seq_len, a.max_blocks, a.steps, a.batch_size, a.processes, a.workdir, a.lr
    )
    print(f"2-process command: {result['command']}")
    print(format_curves(result))
    if a.json:
        print(json.dumps(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
