"""Memory of one router-tuning step with and without gradient checkpointing, over sequence lengths.

Each (sequence length, checkpointing) cell runs in a fresh process: load the model, wrap it,
then one stage-1 training step (routed forward, LM + sparsity loss, backward to the routers)
on random tokens (memory does not depend on the text). Reported per cell:

* ``peak_mb``: on CUDA, ``torch.cuda.max_memory_allocated`` during the step; on CPU, the rise of
  the process's peak resident memory (``ru_maxrss``) over its level after loading the model —
  what the step's activations (and gradients) cost;
* ``step_s``: wall time of the step (checkpointing recomputes each layer's forward in backward).

    python benchmarks/memory.py --model random:llama --seq-lens 128,512        # seconds
    python benchmarks/memory.py --model smollm2-135m --seq-lens 256,1024,2048  # ~2-4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

__all__ = ["measure_step", "run_benchmark"]


def _maxrss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def measure_step(model_spec: str, seq_len: int, batch_size: int, checkpointing: bool, device: str) -> dict:
    """One training step in this process; returns ``{"peak_mb", "step_s", ...}``."""
    import torch

    from skipgpt import SkipGPTConfig, get_skipgpt_model
    from skipgpt.specs import load_base_model
    from skipgpt.train.loop import set_gradient_checkpointing

    base, _ = load_base_model(model_spec)
    model = get_skipgpt_model(base.to(device), SkipGPTConfig(), base_spec=model_spec)
    model.mark_only_routers_trainable()
    model.train()
    set_gradient_checkpointing(model, checkpointing)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _maxrss_mb()
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss + 20 * (model.realised_sparsity() - 0.25).abs()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = _maxrss_mb() - before
    return {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "gradient_checkpointing": checkpointing,
        "peak_mb": round(peak, 1),
        "step_s": round(time.perf_counter() - start, 3),
        "loss": float(loss),
        "measure": "cuda max_memory_allocated" if cuda else "rise of peak RSS",
    }


def run_benchmark(
    model: str, seq_lens: list[int], batch_size: int, device: str, progress: bool = True
) -> list[dict]:
    """Every (seq_len, checkpointing) cell in its own process (a fresh peak-memory counter)."""
    from tqdm.auto import tqdm

    cells = [(t, c) for t in seq_lens for c in (False, True)]
    rows = []
    for seq_len, ckpt in tqdm(cells, desc="memory", disable=not progress):
        cmd = [sys.executable, __file__, "--model", model, "--batch-size", str(batch_size)]
        cmd += [
            "--device",
            device,
            "--one",
            str(seq_len),
            "--checkpointing" if ckpt else "--no-checkpointing",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(
                f"error: cell seq_len={seq_len} checkpointing={ckpt} failed: {done.stderr.strip()[-500:]}"
            )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def _table(rows: list[dict]) -> str:
    from skipgpt.eval.tables import markdown_table

    by = {(r["seq_len"], r["gradient_checkpointing"]): r for r in rows}
    for r in rows:
        off = by[(r["seq_len"], False)]["peak_mb"]
        r["vs_off"] = f"{r['peak_mb'] / off:.2f}×" if off > 0 else "–"
    columns = [
        ("seq len", "seq_len"),
        ("batch", "batch_size"),
        ("checkpointing", lambda r: "on" if r["gradient_checkpointing"] else "off"),
        ("peak MB", "peak_mb"),
        ("vs off", "vs_off"),
        ("step s", "step_s"),
    ]
    return markdown_table(rows, columns) + f"\n\nmemory measure: {rows[0]['measure']}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:llama")
    p.add_argument("--seq-lens", default="128,512", help="comma-separated sequence lengths")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one cell
    p.add_argument(
        "--checkpointing", action=argparse.BooleanOptionalAction, default=False, help=argparse.SUPPRESS
    )
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(measure_step(a.model, a.one, a.batch_size, a.checkpointing, a.device)))
        return 0
    try:
        seq_lens = [int(x) for x in a.seq_lens.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --seq-lens must be comma-separated integers, got {a.seq_lens!r}") from None
    rows = run_benchmark(a.model, seq_lens, a.batch_size, a.device)
    print(_table(rows))
    if a.json:
        print(json.dumps({"model": a.model, "rows": rows}))
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
