"""Throughput of one stage-1 training step, decomposed, beside the frozen-model floor.

One step of the default recipe (``skipgpt train-router``'s, the dataclasses' defaults: dense-start routers,
distill_weight 1, curriculum 0.3) on one batch of ``--dataset`` blocks, run through the
library's own step function (``router_tuning.make_step_fn``), then backward and the AdamW
step of ``train_loop``. The wall time is split into

* teacher forward: the dense teacher (calls of ``forward`` without grad; 0 on a cache hit);
* student forward: the routed forward, of which ``routers`` is the time inside the routers;
* loss: LM + KL + sparsity terms outside the forwards;
* backward, optimiser (clip + AdamW + zero_grad).

The floor is a plain frozen-model forward + backward of the same batch (routing off, LM loss,
gradient down to the input embeddings, so backward crosses every layer as the routers' does).

Variants run side by side: every repetition runs each variant once, in turn (interleaved), so
that load on a shared machine hits all alike; the table gives the median of ``--repeats``.
bf16 variants autocast the forward exactly as accelerate does (``--mixed-precision bf16``);
"teacher cache" variants use ``RouterTuningArgs(teacher_cache=K)``, timed on a hit (every epoch
after the first, or any run with a warm ``teacher_cache_dir``) and on a miss (a new cache each
step: the first epoch, which runs the teacher as today but takes the cheaper top-k KL). Peak
memory is the rise of the resident set over its level at the start of the step, sampled every
2 ms. ``bf16 matmuls`` counts the matmul kernels (mm, addmm, bmm, attention) of one step by
their input dtype (a ``TorchDispatchMode``).

    python benchmarks/train_throughput.py --quick                               # seconds, random:llama
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --threads 1 --repeats 3 \\
        --out results/train_throughput.md                                     # SmolLM2-135M, ~15 min
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

__all__ = ["Variant", "VARIANTS", "run_benchmark", "format_table"]

PARTS = ("teacher", "student", "routers", "loss", "backward", "optimiser")


@dataclass(frozen=True)
class Variant:
    name: str  # the --variants key
    label: str
    kind: str = "step"  # "step" (stage-1 step) | "floor" (frozen forward + backward)
    precision: str = "no"  # LoopArgs.mixed_precision
    teacher_cache: int = 0  # RouterTuningArgs.teacher_cache
    distill: bool = True
    cold: bool = False  # a new (empty) teacher cache every step: the first epoch's cost
    plain_kl: bool = False  # the full KL as one (B, T, V) expression, as before the chunked KL
    fused: bool = True  # LM and KL in one pass over the logits (train.fused_loss)


VARIANTS = {
    v.name: v
    for v in (
        Variant("floor", "floor: frozen fwd+bwd, fp32", kind="floor"),
        Variant("floor-bf16", "floor: frozen fwd+bwd, bf16", kind="floor", precision="bf16"),
        Variant("today", "stage-1 step, fp32, plain KL (the default before #19)", plain_kl=True, fused=False),
        Variant("fp32", "stage-1 step, fp32, LM + KL fused"),
        Variant("no-kd", "stage-1 step, fp32, no distillation", distill=False),
        Variant(
            "bf16", "stage-1 step, bf16 autocast, LM + KL fused (default with native bf16)", precision="bf16"
        ),
        Variant(
            "bf16-separate",
            "stage-1 step, bf16 autocast, LM and chunked KL as two losses (before the fused loss)",
            precision="bf16",
            fused=False,
        ),
        Variant("cache", "stage-1 step, fp32, teacher cache (hit)", teacher_cache=64),
        Variant("cache-miss", "stage-1 step, fp32, teacher cache (miss)", teacher_cache=64, cold=True),
        Variant("bf16-cache", "stage-1 step, bf16 + teacher cache", precision="bf16", teacher_cache=64),
        Variant(
            "bf16-cache-separate",
            "stage-1 step, bf16 + teacher cache, LM and top-k KL as two losses (before the fused loss)",
            precision="bf16",
            teacher_cache=64,
            fused=False,
        ),
    )
}
BASELINE, FLOOR = "today", "floor"


def plain_distillation_loss(student_logits, teacher_logits, temperature=1.0, attention_mask=None):
    """KL(teacher || student) as ``losses.distillation_loss`` computed it before it was chunked:
    one expression over (B, T, V), every temporary kept for autograd."""
    t = temperature
    log_p = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


@contextmanager
def _losses(plain_kl: bool, fused: bool):
    """Inside, the stage-1 step's KL is ``plain_distillation_loss`` (``plain_kl``) and LM and the KL
    are one fused loss or two (the step function calls them through ``train.objectives``)."""
    import skipgpt.train.objectives as objectives

    chunked, fused_before = objectives.distillation_loss, objectives.FUSED_LOSSES
    if plain_kl:
        objectives.distillation_loss = plain_distillation_loss
    objectives.FUSED_LOSSES = fused
    try:
        yield
    finally:
        objectives.distillation_loss, objectives.FUSED_LOSSES = chunked, fused_before


class _RssPeak:
    """Peak resident set (MB) above its level at ``__enter__``, sampled by a thread."""

    def __enter__(self):
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.rise = self.peak - self.start


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Timers:
    def __init__(self):
        self.s = dict.fromkeys(PARTS, 0.0)

    @contextmanager
    def part(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] += time.perf_counter() - t


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class _MatmulDtypes:
    """Counts matmul kernels by the dtype of their first input (a TorchDispatchMode)."""

    OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product", "linear", "matmul")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts: dict[str, int] = {}
        ops = self.OPS

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if any(name == o or name.startswith(o) for o in ops):
                    dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
                    counts[str(dtype).replace("torch.", "")] = (
                        counts.get(str(dtype).replace("torch.", ""), 0) + 1
                    )
                return func(*args, **(kwargs or {}))

        self.counts, self.mode = counts, Mode()


class _Bench:
    """The model, batch and step functions the variants share."""

    def __init__(
        self,
        model_spec: str,
        dataset: str,
        batch_size: int,
        seq_len: int,
        top_k: int,
        max_blocks: int | None,
        router_hidden: int | None = 0,
    ):
        from skipgpt import SkipGPTConfig, get_skipgpt_model
        from skipgpt.data import load_blocks
        from skipgpt.specs import load_base_model
        from skipgpt.train.loop import LoopArgs
        from skipgpt.train.router_tuning import RouterTuningArgs

        torch.manual_seed(0)
        base, tokenizer = load_base_model(model_spec)
        # the dataclasses' defaults are the CLI recipe
        config = SkipGPTConfig(target_sparsity=0.25, router_hidden=router_hidden)
        self.model = get_skipgpt_model(base, config, base_spec=model_spec)
        self.model.mark_only_routers_trainable()
        self.model.train()
        self.blocks = load_blocks(dataset, tokenizer, seq_len, max_blocks=max_blocks)
        if self.blocks.shape[0] < batch_size:
            raise SystemExit(
                f"error: {dataset} has {self.blocks.shape[0]} blocks of {seq_len}, fewer than a batch"
            )
        self.batch = self.blocks[:batch_size]
        self.loop = LoopArgs(max_steps=300, batch_size=batch_size)
        self.tuning = RouterTuningArgs()
        self.top_k = top_k
        self.params = self.model.router_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=self.loop.lr)
        self._step_fns: dict[str, object] = {}
        self._timers: _Timers | None = None
        for router in (r for layer in self.model.routed_layers for r in layer.routers.values()):
            router.register_forward_pre_hook(self._router_in)
            router.register_forward_hook(self._router_out)
        self._router_t0 = 0.0

    def _router_in(self, *_):
        self._router_t0 = time.perf_counter()

    def _router_out(self, *_):
        if self._timers is not None:
            self._timers.s["routers"] += time.perf_counter() - self._router_t0

    def step_fn(self, v: Variant):
        from skipgpt.train.router_tuning import make_step_fn

        if v.name not in self._step_fns or v.cold:
            tuning = replace(
                self.tuning,
                teacher_cache=self.top_k if v.teacher_cache else 0,
                distill_weight=self.tuning.distill_weight if v.distill else 0.0,
            )
            loop = replace(self.loop, mixed_precision=v.precision)
            self._step_fns[v.name] = make_step_fn(self.model, loop, tuning)
        return self._step_fns[v.name]

    def run(self, v: Variant, step: int = 0) -> dict:
        """One step of variant ``v``: seconds per part, total, peak MB, loss terms."""
        timers = _Timers()
        model = self.model

        def forward(**kw):
            teacher = not torch.is_grad_enabled() or torch.is_inference_mode_enabled()
            with timers.part("teacher" if teacher else "student"), _autocast(v.precision):
                out = model(**kw)
            out.logits = out.logits.float()  # accelerate's convert_outputs_to_fp32
            return out

        torch.manual_seed(1234 + step)
        self._timers = timers
        metrics: dict = {}
        with _RssPeak() as mem, _losses(v.plain_kl, v.fused):
            t0 = time.perf_counter()
            if v.kind == "floor":
                loss = self._floor(forward, v)
            else:
                t_fn = time.perf_counter()
                loss, metrics = self.step_fn(v)(forward, self.batch, step)
                timers.s["loss"] += time.perf_counter() - t_fn - timers.s["teacher"] - timers.s["student"]
            with timers.part("backward"):
                loss.backward()
            self._timers = None
            with timers.part("optimiser"):
                if v.kind != "floor":
                    torch.nn.utils.clip_grad_norm_(self.params, self.loop.max_grad_norm)
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total = time.perf_counter() - t0
        with torch.no_grad():  # the benchmark measures steps, not training: routers back to the start
            for p, p0 in zip(self.params, self._initial, strict=True):
                p.copy_(p0)
        self.optimizer.state.clear()
        out = {**timers.s, "total": total, "peak_mb": mem.rise, "loss_value": float(loss.detach())}
        out.update({k: metrics[k] for k in ("lm", "kd") if k in metrics})
        return out

    def _floor(self, forward, v: Variant) -> torch.Tensor:
        from skipgpt.train.losses import shifted_lm_loss

        embed = self.model.get_input_embeddings()
        handle = embed.register_forward_hook(lambda m, i, o: o.requires_grad_())
        try:
            with self.model.dense():
                logits = forward(input_ids=self.batch).logits
        finally:
            handle.remove()
        with self._timers.part("loss"):
            return shifted_lm_loss(logits, self.batch)

    def snapshot(self):
        self._initial = [p.detach().clone() for p in self.params]


def matmul_dtypes(bench: _Bench, v: Variant) -> str:
    """'bf16 a/b' : matmul kernels of one step of ``v`` whose inputs are bf16 (teacher cached)."""
    counter = _MatmulDtypes()
    with counter.mode:
        bench.run(v)
    total = sum(counter.counts.values())
    return f"{counter.counts.get('bfloat16', 0)}/{total}"


def kd_fidelity(bench: _Bench, top_ks: tuple[int, ...]) -> list[dict]:
    """The top-k KL against the full KL on the benchmark batch, with the student routing as at
    step 0 of the recipe (Gumbel at tau_start): value and cosine of the gradients wrt the
    student logits, per k."""
    from skipgpt.train.losses import distillation_loss
    from skipgpt.train.objectives import dense_teacher
    from skipgpt.train.teacher_cache import teacher_targets, topk_distillation_loss

    model, ids = bench.model, bench.batch
    t = bench.tuning.distill_temperature
    with torch.no_grad():
        with dense_teacher(model):
            teacher = model(input_ids=ids).logits.float()
        model.set_temperature(model.skipgpt_config.tau_start)
        torch.manual_seed(1234)
        student = model(input_ids=ids).logits.float()
    student.requires_grad_()
    full = distillation_loss(student, teacher, t)
    (g_full,) = torch.autograd.grad(full, student)
    rows = []
    for k in top_ks:
        kd = topk_distillation_loss(student, teacher_targets(teacher, k, t), t)
        (g,) = torch.autograd.grad(kd, student)
        cos = torch.nn.functional.cosine_similarity(g.flatten(), g_full.flatten(), dim=0)
        p_top = teacher_targets(teacher, k, t)
        mass = (p_top.values - p_top.lse.unsqueeze(-1)).exp().sum(-1).mean()
        rows.append(
            {
                "top_k": k,
                "kd": float(kd.detach()),
                "kd_full": float(full),
                "grad_cosine": float(cos),
                "teacher_mass": float(mass),
            }
        )
    return rows


def run_benchmark(
    model: str,
    dataset: str,
    batch_size: int,
    seq_len: int,
    repeats: int,
    variants: list[Variant],
    top_k: int = 64,
    progress: bool = True,
    max_blocks: int | None = None,
    router_hidden: int | None = 0,
) -> dict:
    """Interleaved repetitions of every variant; returns the rows (medians) and the settings."""
    from tqdm.auto import tqdm

    bench = _Bench(model, dataset, batch_size, seq_len, top_k, max_blocks, router_hidden)
    bench.snapshot()
    for v in variants:  # the teacher caches filled, so that the hit variants count a hit's matmuls
        if v.teacher_cache and not v.cold:
            bench.run(v)
    # one untimed step per variant, matmuls counted: warms the allocator and oneDNN
    dtypes = {v.name: matmul_dtypes(bench, v) for v in variants}
    samples: dict[str, list[dict]] = {v.name: [] for v in variants}
    bar = tqdm(total=repeats * len(variants), desc="train throughput", disable=not progress)
    for rep in range(repeats):
        for v in variants:
            samples[v.name].append(bench.run(v, step=rep))
            bar.update(1)
    bar.close()
    tokens = batch_size * seq_len
    rows = []
    for v in variants:
        runs = samples[v.name]
        row = {
            "variant": v.name,
            "label": v.label,
            **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
        }
        row["tokens_per_s"] = tokens / row["total"]
        row["bf16_matmuls"] = dtypes[v.name]
        row["totals"] = [r["total"] for r in runs]
        rows.append(row)
    by = {r["variant"]: r for r in rows}
    precision = {v.name: v.precision for v in variants}
    floors = {precision[n]: r for n, r in by.items() if VARIANTS[n].kind == "floor"}
    for r in rows:
        r["vs_floor"] = r["total"] / by[FLOOR]["total"] if FLOOR in by else None
        same = floors.get(precision[r["variant"]])  # the floor in the step's own precision
        r["vs_floor_same"] = r["total"] / same["total"] if same is not None else None
        r["speedup"] = by[BASELINE]["total"] / r["total"] if BASELINE in by else None
    epochs = bench.loop.max_steps * batch_size / bench.blocks.shape[0]
    return {
        "rows": rows,
        "kd_fidelity": kd_fidelity(bench, (16, 64, 256)),
        "settings": {
            "model": model,
            "dataset": dataset,
            "batch": batch_size,
            "seq_len": seq_len,
            "repeats": repeats,
            "teacher_cache_top_k": top_k,
            "blocks": int(bench.blocks.shape[0]),
            "epochs_in_300_steps": round(epochs, 2),
            "machine": _machine(),
        },
    }


def _machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def format_table(result: dict) -> str:
    from skipgpt.eval.tables import markdown_table

    def sec(key):
        return lambda r: f"{r[key]:.2f}"

    def times(key):
        return lambda r: "–" if r[key] is None else f"{r[key]:.2f}×"

    columns = [
        ("variant", "label"),
        ("teacher fwd s", sec("teacher")),
        ("student fwd s", sec("student")),
        ("of which routers s", sec("routers")),
        ("loss s", sec("loss")),
        ("backward s", sec("backward")),
        ("optimiser s", sec("optimiser")),
        ("step s", sec("total")),
        ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}"),
        ("vs floor fp32", times("vs_floor")),
        ("vs floor, same precision", times("vs_floor_same")),
        ("speed vs today", times("speedup")),
        ("peak MB", lambda r: f"{r['peak_mb']:.0f}"),
        ("bf16 matmuls", "bf16_matmuls"),
        ("KD", lambda r: f"{r['kd']:.4f}" if "kd" in r else "–"),
    ]
    s = result["settings"]
    note = (
        f"{s['model']}, {s['dataset']} batch {s['batch']}×{s['seq_len']}, median of {s['repeats']} interleaved "
        f"repetitions; {s['machine']}. Teacher cache: top-{s['teacher_cache_top_k']} logits; a hit is every epoch "
        f"after the first, a miss the first ({s['blocks']} blocks: a 300-step run at this batch is "
        f"{s['epochs_in_300_steps']} epochs). Peak MB: rise of the resident set during the step. KD: the distillation "
        "term of that step (the cached one is the top-k KL)."
    )
    fidelity = markdown_table(
        result["kd_fidelity"],
        [
            ("cached top-k", "top_k"),
            ("teacher mass in top-k", lambda r: f"{r['teacher_mass']:.4f}"),
            ("KD top-k", lambda r: f"{r['kd']:.5f}"),
            ("KD full", lambda r: f"{r['kd_full']:.5f}"),
            ("KD ratio", lambda r: f"{r['kd'] / r['kd_full']:.4f}" if r["kd_full"] else "–"),
            ("grad cosine", lambda r: f"{r['grad_cosine']:.5f}"),
        ],
    )
    fidelity_note = (
        "Top-k KL (teacher cache) against the full KL on the same batch, the student routing as at step 0 of "
        "the recipe (Gumbel at tau_start): its value and the cosine between its gradient and the full KL's, "
        "with respect to the student logits."
    )
    return (
        markdown_table(result["rows"], columns) + "\n\n" + note + "\n\n" + fidelity + "\n\n" + fidelity_note
    )


def loss_curves(
    model_spec: str, dataset: str, batch_size: int, seq_len: int, steps: int, log=None, router_hidden=0
) -> dict[str, list[dict]]:
    """Stage-1 runs of ``steps`` steps with the CLI recipe: fp32 and bf16 autocast at seed 0, and
    fp32 at seed 1 (the noise scale: other batches order and Gumbel noise). Per-step history."""
    import tempfile

    from skipgpt import SkipGPTConfig, get_skipgpt_model
    from skipgpt.data import load_blocks
    from skipgpt.specs import load_base_model
    from skipgpt.train.loop import LoopArgs, make_accelerator
    from skipgpt.train.router_tuning import RouterTuningArgs, train_routers

    runs = {"fp32 seed 0": ("no", 0), "bf16 seed 0": ("bf16", 0), "fp32 seed 1": ("no", 1)}
    histories = {}
    blocks = None
    for name, (precision, seed) in runs.items():
        torch.manual_seed(seed)
        base, tokenizer = load_base_model(model_spec)
        blocks = load_blocks(dataset, tokenizer, seq_len) if blocks is None else blocks
        config = SkipGPTConfig(target_sparsity=0.25, router_hidden=router_hidden)
        model = get_skipgpt_model(base, config, base_spec=model_spec)
        loop = LoopArgs(
            max_steps=steps,
            batch_size=batch_size,
            seed=seed,
            save_every=steps,
            mixed_precision=precision,
        )
        tuning = RouterTuningArgs(calibrate_blocks=0)

        def on_step(step, metrics, name=name):
            if log is not None:
                log.write(json.dumps({"run": name, "step": step, **metrics}) + "\n")
                log.flush()

        with tempfile.TemporaryDirectory() as out:
            histories[name] = train_routers(
                model, blocks, Path(out) / "r", loop, tuning, on_step=on_step, progress=False
            )["history"]
    make_accelerator("no")
    return histories


def format_curves(histories: dict[str, list[dict]], window: int = 10) -> str:
    """Mean loss / KD / sparsity per window of steps, and the bf16 - fp32 gap beside the seed gap."""
    from skipgpt.eval.tables import markdown_table

    a, b, c = (histories[k] for k in ("fp32 seed 0", "bf16 seed 0", "fp32 seed 1"))
    rows = []
    for start in range(0, len(a), window):

        def mean(h, key, start=start):
            part = h[start : start + window]
            return sum(x[key] for x in part) / len(part)

        rows.append(
            {
                "steps": f"{start}-{min(start + window, len(a)) - 1}",
                **{
                    f"{n} {k}": mean(h, k)
                    for n, h in (("fp32", a), ("bf16", b), ("seed1", c))
                    for k in ("loss", "kd", "sparsity")
                },
            }
        )
    gap = sum(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) / len(a)
    noise = sum(abs(x["loss"] - y["loss"]) for x, y in zip(a, c, strict=True)) / len(a)
    cols = [("steps", "steps")] + [
        (f"{n} {k}", (lambda key: lambda r: f"{r[key]:.4f}")(f"{n} {k}"))
        for k in ("loss", "kd", "sparsity")
        for n in ("fp32", "bf16", "seed1")
    ]
    return (
        markdown_table(rows, cols)
        + f"\n\nmean |loss(bf16) - loss(fp32)| per step at the same seed: {gap:.4f}; "
        + f"mean |loss(fp32, seed 1) - loss(fp32, seed 0)|: {noise:.4f} (the noise scale)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="calib")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-blocks", type=int, default=None, help="load at most this many blocks")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per variant (median)")
    p.add_argument("--top-k", type=int, default=64, help="teacher cache: logits kept per token")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS)
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--router-hidden",
        type=int,
        default=0,
        help="router width (0, the default router: linear; the tables before 2026-12-07 used 144 = d/4)",
    )
    p.add_argument("--quick", action="store_true", help="random:llama, 2×64, 1 repetition (a smoke test)")
    p.add_argument(
        "--out", default=None, help="also write the table here (markdown) and the rows beside (.json)"
    )
    p.add_argument(
        "--loss-curve",
        type=int,
        default=None,
        metavar="STEPS",
        help="instead: train STEPS steps in fp32 and bf16 (seed 0) and fp32 (seed 1), compare the losses",
    )
    a = p.parse_args()
    if a.quick:
        a.model, a.batch_size, a.seq_len, a.repeats, a.max_blocks = "random:llama", 2, 64, 1, 16
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.loss_curve:
        log = open(Path(a.out).with_suffix(".jsonl"), "w") if a.out else None  # noqa: SIM115
        histories = loss_curves(
            a.model, a.dataset, a.batch_size, a.seq_len, a.loss_curve, log=log, router_hidden=a.router_hidden
        )
        settings = (
            f"{a.model}, {a.dataset}, {a.loss_curve} steps of {a.batch_size}×{a.seq_len}, CLI recipe; "
            f"{_machine()}"
        )
        table = format_curves(histories) + "\n\n" + settings
        print(table)
        if a.out:
            command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
            Path(a.out).write_text(f"`{command}`\n\n{table}\n")
        return 0
    names = [n.strip() for n in a.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant {unknown[0]!r}; choose from: {', '.join(VARIANTS)}")
    result = run_benchmark(
        a.model,
        a.dataset,
        a.batch_size,
        a.seq_len,
        a.repeats,
        [VARIANTS[n] for n in names],
        a.top_k,
        max_blocks=a.max_blocks,
        router_hidden=a.router_hidden,
    )
    table = format_table(result)
    print(table)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])
        out.write_text(f"`{command}`\n\n{table}\n")
        out.with_suffix(".json").write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
