"""One prepared GPU check: dense vs masked vs fast at real model shapes, fast == masked, host syncs.

    pip install --no-deps -e . && python benchmarks/gpu_check.py --out $OUT      # one H100, <= 6 min
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check     # seconds (the test suite)

Builds random-weight Llama models with real shapes (Llama-3.2-1B and Llama-3.1-8B configs, bf16
on CUDA; no download), routes them randomly (each (token, module) skips with a fixed rate: 25%,
40%, and an attention-heavy mix like the trained routers', attn 56% / mlp 22%; the fused routers
still run and their answer is discarded, so their cost is in the times), and measures, with
CUDA events on a GPU (``time.perf_counter`` on a CPU):

* prefill 1x2048 and 8x512 (one forward into a fresh StaticCache, logits of the last token);
* decode batch 1, 8 and 32 after 1024 context tokens (StaticCache; the context is filled once,
  untimed, and each timed run decodes the same teacher-forced tokens on a copy of it);

dense vs masked (every module on every token, times the gate) vs fast (really skips), median
of the repeats with the variants interleaved, with the ideal (FLOP) and bandwidth-bound speedups
of the decisions actually taken (``skipgpt.costs``). It also checks fast == masked (logits of
a prefill and decode steps, and the K/V cache contents, within the dtype's tolerance) and counts
the host synchronisations of one decode step and one prefill per variant (``skipgpt.eval.syncs``;
on CUDA also ``torch.cuda.set_sync_debug_mode``). Writes ``gpu_check.json`` and ``gpu_check.md``
into ``--out``.

Needs only torch and transformers besides skipgpt itself (``pip install --no-deps -e .``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

MODELS = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=257,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}
ROUTINGS = {
    "random 25%": {"attn": 0.25, "mlp": 0.25},
    "random 40%": {"attn": 0.40, "mlp": 0.40},
    "attn-heavy (56/22)": {"attn": 0.56, "mlp": 0.22},
}
VARIANTS = ("dense", "masked", "fast")
# (kind, batch, tokens): prefill B x T; decode batch B after `context` tokens
FULL = dict(
    scenarios=[
        ("prefill", 1, 2048),
        ("prefill", 8, 512),
        ("decode", 1, 0),
        ("decode", 8, 0),
        ("decode", 32, 0),
    ],
    context=1024,
    steps=32,
)
TINY = dict(
    scenarios=[("prefill", 1, 64), ("prefill", 4, 32), ("decode", 1, 0), ("decode", 8, 0), ("decode", 32, 0)],
    context=32,
    steps=4,
)


def machine(device: torch.device) -> str:
    import transformers

    from skipgpt.eval.speed import cpu_name

    host = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    libs = f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} (CUDA {torch.version.cuda}); host {host}; {libs}"
    return f"{host}; {libs}"


# -- model and routing -----------------------------------------------------------------------------
def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight Llama of ``MODELS[name]``'s shape, wrapped by skipgpt (routers float32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from skipgpt import SkipGPTConfig, get_skipgpt_model

    config = LlamaConfig(**MODELS[name], pad_token_id=None, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return get_skipgpt_model(model, SkipGPTConfig())


def routing(model, variant: str, rates: dict[str, float], seed: int = 0, **extra):
    """Dense, or each (token, module) skipping with probability ``rates[module]`` (drawn on the
    model's device; the fused routers run and their answer is discarded, so their cost is timed)."""
    from skipgpt.routing import RandomPolicy

    if variant == "dense":
        return model.dense()
    policy = RandomPolicy(rates, seed, router_overhead=True)
    return model.routing(execution=variant, policy=policy, **extra)


# -- timing ----------------------------------------------------------------------------------------
class Clock:
    """CUDA events on a GPU (time on the device's queue), perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> float:
        """Seconds since ``start``."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return start.elapsed_time(ev) / 1e3
        return time.perf_counter() - start


def _static_cache(model, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_len)


class Scenario:
    def __init__(self, model, kind: str, batch: int, tokens: int, context: int, steps: int, seed: int):
        from skipgpt.adapters import model_cache_argument

        self.model, self.kind, self.batch = model, kind, batch
        self.arg = model_cache_argument(model)
        self.length = tokens if kind == "prefill" else context
        self.steps = steps if kind == "decode" else 0
        self.name = f"prefill {batch}x{tokens}" if kind == "prefill" else f"decode b{batch} (ctx {context})"
        device = next(model.parameters()).device
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, self.length + self.steps), generator=g)
        self.ids = ids.to(device)
        self.template = None

    @property
    def tokens_per_run(self) -> int:
        return self.batch * (self.length if self.kind == "prefill" else self.steps)

    def _forward(self, ids, cache, **kw):
        return self.model(input_ids=ids, **{self.arg: cache}, use_cache=True, **kw)

    def prepare(self) -> None:
        """Decode: fill the context into a StaticCache once (dense, untimed)."""
        if self.kind == "decode" and self.template is None:
            self.template = _static_cache(self.model, self.length + self.steps)
            with self.model.dense():
                self._forward(self.ids[:, : self.length], self.template, logits_to_keep=1)

    def run(self, clock: Clock) -> float:
        """Seconds of one prefill, or of all decode steps on a copy of the filled cache."""
        if self.kind == "prefill":
            cache = _static_cache(self.model, self.length)
            t0 = clock.start()
            self._forward(self.ids, cache, logits_to_keep=1)
            return clock.stop(t0)
        cache = copy.deepcopy(self.template)
        t0 = clock.start()
        for s in range(self.steps):
            self._forward(self.ids[:, self.length + s : self.length + s + 1], cache)
        return clock.stop(t0)

    def records(self, decisions):
        from skipgpt.costs import ForwardRecord

        if self.kind == "prefill":
            forwards = [(self.length, 0)]
        else:
            forwards = [(1, self.length + s) for s in range(self.steps)]
        return [
            ForwardRecord(
                self.batch,
                length,
                past=past,
                logits_tokens=self.batch,
                execute={k: v[i] for k, v in decisions.items() if i < len(v)},
            )
            for i, (length, past) in enumerate(forwards)
        ]


def measure(
    model, sc: Scenario, rates, clock: Clock, repeats: int, warmup: int, bytes_per_param: int
) -> dict:
    from skipgpt.costs import CostModel, routing_cost, routing_traffic

    sc.prepare()
    times = {v: [] for v in VARIANTS}
    for r in range(warmup + repeats):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # no variant always first
        for v in order:
            with routing(model, v, rates):
                t = sc.run(clock)
            if r >= warmup:
                times[v].append(t)
    # the decisions the timed fast runs took (same seed), untimed
    model.reset_stats()
    with routing(model, "fast", rates, keep_decisions=True):
        sc.run(clock)
        decisions = {k: list(v) for k, v in model.state.decisions.items()}
        stats = model.sparsity_stats()
    model.reset_stats()
    cost = CostModel.from_config(model.config, router_hidden=model.config.hidden_size // 4)
    records = sc.records(decisions)
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    row = {
        "scenario": sc.name,
        "kind": sc.kind,
        "batch": sc.batch,
        **{f"{v}_ms": round(med[v] * 1e3, 3) for v in VARIANTS},
        **{f"{v}_tok_s": round(sc.tokens_per_run / med[v], 1) for v in VARIANTS},
        "masked_speedup": round(med["dense"] / med["masked"], 4),
        "speedup": round(med["dense"] / med["fast"], 4),
        "ideal_speedup": round(routing_cost(cost, records)["ideal_speedup"], 4),
        "skipped": {k: round(float(stats[k]), 4) for k in ("attn", "mlp", "module")},
        "times_s": {v: [round(t, 6) for t in times[v]] for v in VARIANTS},
    }
    if sc.kind == "decode":
        traffic = routing_traffic(cost, records, bytes_per_param=bytes_per_param)
        row["ideal_speedup_memory"] = round(traffic["ideal_speedup"], 4)
    return row


# -- fast == masked ----------------------------------------------------------------------------------
def equality(model, rates, batch: int, length: int, steps: int, tol: float) -> dict:
    """Prefill (batch x length) then ``steps`` decode steps through a StaticCache, masked vs fast:
    the largest difference of logits and of cache contents, relative to the masked values' largest."""
    from skipgpt.adapters import model_cache_argument

    arg = model_cache_argument(model)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length + steps), generator=g).to(device)
    seen = {}
    for v in ("masked", "fast"):
        cache = _static_cache(model, length + steps)
        with routing(model, v, rates, seed=3):
            logits = [model(input_ids=ids[:, :length], **{arg: cache}, use_cache=True).logits]
            for s in range(steps):
                tok = ids[:, length + s : length + s + 1]
                logits.append(model(input_ids=tok, **{arg: cache}, use_cache=True).logits)
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        seen[v] = (torch.cat(logits, 1).float(), torch.stack([t.float() for t in kv]))

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    out = {
        "prefill": f"{batch}x{length}",
        "decode_steps": steps,
        "logits_rel_max_diff": rel(seen["fast"][0], seen["masked"][0]),
        "cache_rel_max_diff": rel(seen["fast"][1], seen["masked"][1]),
        "argmax_agreement": float(
            (seen["fast"][0].argmax(-1) == seen["masked"][0].argmax(-1)).float().mean()
        ),
        "tolerance": tol,
    }
    out["ok"] = out["logits_rel_max_diff"] <= tol and out["cache_rel_max_diff"] <= tol
    return out


# -- host synchronisations -------------------------------------------------------------------------
def count_syncs(model, rates, batch: int, context: int, policy: str) -> dict:
    """Host syncs of one decode step (batch ``batch`` after ``context`` tokens) and of the prefill
    before it, per variant, counted with ``skipgpt.eval.syncs`` (and the CUDA sync debug mode)."""
    from skipgpt.adapters import model_cache_argument
    from skipgpt.eval.syncs import count_host_syncs
    from skipgpt.fast import sync_policy

    arg = model_cache_argument(model)
    device = next(model.parameters()).device
    ids = torch.randint(
        0, model.config.vocab_size, (batch, context + 2), generator=torch.Generator().manual_seed(2)
    )
    ids = ids.to(device)
    out = {}
    for v in VARIANTS:
        cache = _static_cache(model, context + 2)
        with sync_policy(policy), routing(model, v, rates):
            with count_host_syncs() as pre:
                model(input_ids=ids[:, :context], **{arg: cache}, use_cache=True, logits_to_keep=1)
            model(input_ids=ids[:, context : context + 1], **{arg: cache}, use_cache=True)
            with count_host_syncs() as step:
                model(input_ids=ids[:, context + 1 :], **{arg: cache}, use_cache=True)
            row = {
                "decode_step": step.total,
                "decode_step_skipgpt": step.count("skipgpt/"),
                "prefill": pre.total,
                "prefill_skipgpt": pre.count("skipgpt/"),
                "decode_step_sites": step.by_site(),
            }
            if device.type == "cuda":  # the ground truth: what the CUDA runtime reports
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        model(input_ids=ids[:, context + 1 :], **{arg: cache}, use_cache=True)
                        torch.cuda.set_sync_debug_mode("default")
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                row["decode_step_cuda_sync_debug"] = sum("synchroniz" in str(w.message) for w in caught)
        out[v] = row
    return out


# -- report ----------------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}.",
        f"Settings: {json.dumps(result['settings'])}",
        "",
        "| model | routing | scenario | dense ms | masked ms | fast ms | masked/dense | fast/dense "
        "| ideal (bw) | skipped attn/mlp |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ideal = f"{r['ideal_speedup']:.2f}x"
        if "ideal_speedup_memory" in r:
            ideal += f" ({r['ideal_speedup_memory']:.2f}x)"
        lines.append(
            f"| {r['model']} | {r['routing']} | {r['scenario']} | {r['dense_ms']:.2f} | {r['masked_ms']:.2f} "
            f"| {r['fast_ms']:.2f} | {r['masked_speedup']:.2f}x | {r['speedup']:.2f}x | {ideal} "
            f"| {r['skipped']['attn']:.0%}/{r['skipped']['mlp']:.0%} |"
        )
    lines += ["", "fast == masked (relative max difference; tolerance per dtype):", ""]
    lines += ["| model | routing | logits | cache | argmax agree | ok |", "|---|---|---:|---:|---:|---|"]
    for e in result["equality"]:
        lines.append(
            f"| {e['model']} | {e['routing']} | {e['logits_rel_max_diff']:.2e} | {e['cache_rel_max_diff']:.2e} "
            f"| {e['argmax_agreement']:.1%} | {'✓' if e['ok'] else '✗'} (tol {e['tolerance']:g}) |"
        )
    lines += ["", "Host synchronisations (skipgpt's own / all; prefill of the context, one decode step):", ""]
    lines += [
        "| model | policy | batch | variant | prefill | decode step | CUDA sync debug |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for s in result["syncs"]:
        for v, c in s["variants"].items():
            lines.append(
                f"| {s['model']} | {s['policy']} | {s['batch']} | {v} | {c['prefill_skipgpt']}/{c['prefill']} "
                f"| {c['decode_step_skipgpt']}/{c['decode_step']} | {c.get('decode_step_cuda_sync_debug', '-')} |"
            )
    lines += [
        "",
        "Times: median over the repeats (CUDA events on a GPU, perf_counter on a CPU); decode times are "
        "all steps of a run. ideal = FLOP bound of the decisions taken; bw = bandwidth bound of a decode "
        "step (a module's weights are read if any sequence executes it).",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny config and short scenarios (seconds)")
    p.add_argument("--models", default=None, help="comma-separated, of " + ",".join(MODELS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without install
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if device.type == "auto":
        device = torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = (
        args.models.split(",")
        if args.models
        else (["tiny"] if args.tiny else ["llama-3.2-1b", "llama-3.1-8b"])
    )
    plan = TINY if args.tiny else FULL
    tol = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    settings = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "models": models,
        "routings": ROUTINGS,
        "scenarios": [list(s) for s in plan["scenarios"]],
        "decode_context": plan["context"],
        "decode_steps": plan["steps"],
        "cache": "StaticCache",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "statistic": "median",
        "timer": "CUDA events" if device.type == "cuda" else "perf_counter",
    }
    result = {"machine": machine(device), "settings": settings, "rows": [], "equality": [], "syncs": []}
    print(f"machine: {result['machine']}")
    print(f"settings: {json.dumps(settings)}", flush=True)
    clock = Clock(device)
    t_start = time.time()
    for name in models:
        model = build(name, device, dtype)
        with torch.inference_mode():
            for rname, rates in ROUTINGS.items():
                e = equality(model, rates, batch=2, length=min(64, plan["context"]), steps=4, tol=tol)
                result["equality"].append({"model": name, "routing": rname, **e})
                print(f"[{time.time() - t_start:6.1f}s] {name} {rname}: fast == masked {e}", flush=True)
            policies = ["auto"] if device.type == "cuda" else ["host", "device"]
            for policy in policies:
                for b in (1, 8):
                    c = count_syncs(model, ROUTINGS["random 40%"], b, min(64, plan["context"]), policy)
                    result["syncs"].append({"model": name, "policy": policy, "batch": b, "variants": c})
                    brief = {v: (x["prefill_skipgpt"], x["decode_step_skipgpt"]) for v, x in c.items()}
                    print(
                        f"[{time.time() - t_start:6.1f}s] {name} syncs ({policy}, b{b}) (prefill, step): {brief}"
                    )
            for kind, b, tokens in plan["scenarios"]:
                sc = Scenario(model, kind, b, tokens, plan["context"], plan["steps"], seed=0)
                for rname, rates in ROUTINGS.items():
                    row = measure(model, sc, rates, clock, args.repeats, args.warmup, dtype.itemsize)
                    result["rows"].append({"model": name, "routing": rname, **row})
                    print(
                        f"[{time.time() - t_start:6.1f}s] {name} {rname} {sc.name}: dense {row['dense_ms']:.2f} ms, "
                        f"masked {row['masked_ms']:.2f} ms, fast {row['fast_ms']:.2f} ms -> {row['speedup']:.2f}x "
                        f"(ideal {row['ideal_speedup']:.2f}x)",
                        flush=True,
                    )
                sc.template = None
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    settings["wall_s"] = round(time.time() - t_start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(result)
    (out / "gpu_check.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({settings['wall_s']} s)")
    return 0 if all(e["ok"] for e in result["equality"]) else 1


if __name__ == "__main__":
    sys.exit(main())
