"""Copy result tables made by the benchmark commands into README.md (never typed by hand).

A README section ``<!-- results:NAME -->`` … ``<!-- /results:NAME -->`` is replaced by the
file named in ``SECTIONS`` (a markdown table + settings line written by its command).

    python benchmarks/update_readme.py            # after running the commands below
    python benchmarks/update_readme.py frontier   # only the sections named
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the demo of 0.1.x (default recipe, module target 0.25, 150 steps x 4 blocks, fp32): the routers
# of the speed, sweep and zero-shot tables. Tables made before 2026-12-07, when the default router
# was d/4 (Linear(d, d/4) -> ReLU -> Linear(d/4, 2)), name it: --router-hidden 144 (d = 576)
OLD_ROUTER = "--router-hidden 144"
OLD_DEMO = (
    "skipgpt demo --recipe default --budget modules --target-sparsity 0.25 --max-steps 150 --batch-size 4 "
    f"--mixed-precision no {OLD_ROUTER} --output runs/demo"
)
# the demo of today (runs/demo/routers: the routers of the demo, bench-demo, frontier-demo and
# serve-load-demo sections)
DEMO = "skipgpt demo --output runs/demo"
# name -> (result file, the command that writes it)
SECTIONS = {
    "frontier": ("results/frontier.md", "bash benchmarks/frontier_variants.sh"),
    "demo": ("results/demo.md", f"{DEMO} && cp runs/demo/results.md results/demo.md"),
    "bench-demo": (
        "results/bench_demo.md",
        f"{DEMO} && python benchmarks/bench_speed.py --model runs/demo/routers --repeats 5 "
        "--out results/bench_demo.json",
    ),
    "frontier-budget": (
        "results/frontier_budget.md",
        f"{DEMO} && skipgpt train-router --model smollm2-135m --recipe frontier --target-sparsity 0.25 "
        "--max-steps 110 --batch-size 8 --seq-len 256 --output runs/rt25-frontier "
        "&& OMP_NUM_THREADS=2 skipgpt frontier --model smollm2-135m --routers runs/demo/routers "
        "--routers runs/rt25-frontier --thetas 0.5,0.7,0.8,0.9,0.95 --max-layers 8 "
        "--baselines shortgpt,llm-drop,substitute --max-windows 4 --repeats 3 --scenarios prefill_1x1024 "
        "--statistic min --output runs/frontier-budget "
        "&& cp runs/frontier-budget/frontier.md results/frontier_budget.md "
        "&& cp runs/frontier-budget/frontier.json results/frontier_budget.json "
        "&& cp runs/frontier-budget/frontier.png results/frontier_budget.png",
    ),
    "frontier-300": (
        "results/frontier_300.md",
        f"{DEMO} && for t in 25 35; do skipgpt train-router --model smollm2-135m --recipe frontier "
        "--target-sparsity 0.$t --max-steps 300 --batch-size 8 --seq-len 256 --output runs/rt$t-frontier-300; done "
        "&& OMP_NUM_THREADS=2 skipgpt frontier --model smollm2-135m --routers runs/demo/routers "
        "--routers runs/rt25-frontier-300 --routers runs/rt35-frontier-300 --thetas 0.5,0.8,0.9,0.95 --max-layers 9 "
        "--baselines shortgpt,llm-drop,substitute --max-windows 4 --repeats 3 --scenarios prefill_1x1024,decode_b1 "
        "--statistic min --output runs/frontier-final "
        "&& cp runs/frontier-final/frontier.md results/frontier_300.md "
        "&& cp runs/frontier-final/frontier.json results/frontier_300.json "
        "&& cp runs/frontier-final/frontier.png results/frontier_300.png",
    ),
    "frontier-hybrid": ("results/frontier_hybrid.md", "bash benchmarks/frontier_hybrid.sh"),
    "frontier-100": ("results/frontier_100.md", "bash benchmarks/frontier_100.sh"),
    "frontier-demo": (
        "results/frontier_demo.md",
        f"{DEMO} && OMP_NUM_THREADS=2 skipgpt frontier --model smollm2-135m "
        "--routers runs/demo/routers --thetas 0.5,0.65,0.7578,0.85,0.9,0.95 --max-layers 6 "
        "--baselines shortgpt,llm-drop --max-windows 4 --repeats 3 --scenarios prefill_1x1024,decode_b1 "
        "--decode-steps 16 --decode-context 128 --statistic min --output runs/frontier-demo "
        "&& cp runs/frontier-demo/frontier.md results/frontier_demo.md "
        "&& cp runs/frontier-demo/frontier.json results/frontier_demo.json "
        "&& cp runs/frontier-demo/frontier.png results/frontier_demo.png",
    ),
    "demo-default-recipe": (
        "results/demo_default_recipe.md",
        f"{OLD_DEMO} && cp runs/demo/results.md results/demo_default_recipe.md",
    ),
    "demo-params": (
        "results/demo_params.md",
        "skipgpt demo --recipe default --budget params --target-sparsity 0.167 --max-steps 150 --batch-size 4 "
        f"--mixed-precision no {OLD_ROUTER} --output runs/demo-params && cp runs/demo-params/results.md results/demo_params.md",
    ),
    "recipe": (
        "results/recipe.md",
        f"python benchmarks/recipe.py --steps 100 --batch-size 4 --eval-windows 16 {OLD_ROUTER} --out runs/recipe-100x4 "
        "&& cp runs/recipe-100x4/recipe.md results/recipe.md",
    ),
    "recipe-curve": (
        "results/recipe_curve.md",
        "python benchmarks/recipe.py --variants dense-init+distill+curriculum --steps 300 --batch-size 8 "
        f"--eval-windows 16 --curve-every 50 {OLD_ROUTER} --out runs/recipe-curve "
        "&& cp runs/recipe-curve/recipe.md results/recipe_curve.md "
        "&& cp runs/recipe-curve/dense-init+distill+curriculum.curve.png results/",
    ),
    "bench": (
        "results/bench.md",
        "python benchmarks/bench_speed.py --model smollm2-135m --random-routing 0.4 --repeats 7 "
        f"{OLD_ROUTER} --out results/bench.json",
    ),
    "bench-trained": (
        "results/bench_trained40.md",
        f"{OLD_DEMO} && skipgpt calibrate --model runs/demo/routers --target-sparsity 0.4 --output runs/demo-40 "
        "&& python benchmarks/bench_speed.py --model runs/demo-40 --repeats 7 --out results/bench_trained40.json",
    ),
    "bench-trained-static": (
        "results/bench_trained40_static.md",
        "python benchmarks/bench_speed.py --model runs/demo-40 --repeats 7 --cache static "
        "--scenarios decode_b1,decode_b8 --out results/bench_trained40_static.json",
    ),
    "sweep": (
        "results/sweep_demo.md",
        f"{OLD_DEMO} && skipgpt bench --model runs/demo/routers --sweep 0,0.5,0.7819,0.85,0.9049,0.95 --sweep-windows 16 "
        "--scenarios prefill_1x1024,decode_b1 --repeats 5 > results/sweep_demo.md",
    ),
    "lora": (
        "results/lora.md",
        f"skipgpt train-router --model smollm2-135m --max-steps 100 --batch-size 4 {OLD_ROUTER} --output runs/rt100 "
        "&& python benchmarks/lora_table.py --routers runs/rt100 --stage2-distill-weight 1 --steps 50 --batch-size 4 "
        "--eval-windows 16 "
        "--out runs/lora-rt100-kd && cp runs/lora-rt100-kd/lora.md results/lora.md",
    ),
    "compare": (
        "results/compare.md",
        "skipgpt compare --model smollm2-135m --target-sparsity 0.25 --max-steps 100 --batch-size 4 "
        f"--max-windows 16 {OLD_ROUTER} --output runs/compare-100x4 && cp runs/compare-100x4/compare.md results/compare.md",
    ),
    "train-throughput": (
        "results/train_throughput.md",
        "python benchmarks/train_throughput.py --threads 2 --repeats 3 --variants "
        "floor,floor-bf16,today,bf16,bf16-separate,bf16-cache,bf16-cache-separate --out results/train_throughput.md",
    ),
    "serve-load": (
        "results/serve_load.md",
        ".venv-serve/bin/python benchmarks/serve_load.py --model runs/rt100-m25 --model runs/rt100-m40 "
        "--rounds 1 --out results/serve_load.json",
    ),
    "serve-load-demo": (
        "results/serve_load_demo.md",
        f"{DEMO} && skipgpt calibrate --model runs/demo/routers --target-sparsity 0.25 --output runs/demo-cal25 "
        "&& skipgpt calibrate --model runs/demo/routers --target-sparsity 0.40 --output runs/demo-cal40 "
        "&& for m in runs/demo/routers runs/demo-cal25 runs/demo-cal40; do .venv-serve/bin/skipgpt serve-tune "
        "--model $m; done && .venv-serve/bin/python benchmarks/serve_load.py --model runs/demo/routers "
        "--model runs/demo-cal25 --model runs/demo-cal40 --server-lives 3 --rounds 2 --out results/serve_load_demo.json",
    ),
    "serve-tune-demo": (
        "results/serve_tune_demo.md",
        f"{DEMO} && skipgpt calibrate --model runs/demo/routers --target-sparsity 0.25 --output runs/demo-cal25 "
        "&& skipgpt calibrate --model runs/demo/routers --target-sparsity 0.40 --output runs/demo-cal40 "
        "&& for t in 0.7578125 0.987523078918457 0.9998875260353088; do .venv-serve/bin/skipgpt serve-tune "
        "--model runs/demo/routers --threshold $t; done "
        "&& .venv-serve/bin/python benchmarks/serve_tune_table.py --model runs/demo/routers "
        "--out results/serve_tune_demo.md",
    ),
    "serve-ab-demo": (
        "results/serve_ab_demo.md",
        f"{DEMO} && skipgpt calibrate --model runs/demo/routers --target-sparsity 0.25 --output runs/demo-cal25 "
        "&& skipgpt calibrate --model runs/demo/routers --target-sparsity 0.40 --output runs/demo-cal40 "
        "&& for t in 0.7578125 0.987523078918457 0.9998875260353088; do .venv-serve/bin/skipgpt serve-tune "
        "--model runs/demo/routers --threshold $t; done "
        "&& .venv-serve/bin/python benchmarks/serve_ab.py --model runs/demo/routers "
        "--threshold 0.7578125 --threshold 0.987523078918457 --threshold 0.9998875260353088 "
        "--route-all --rounds 7 --statistic best --out results/serve_ab_demo.json",
    ),
    "loss-speed": ("results/loss_speed.md", "python benchmarks/loss_speed.py --out results/loss_speed.md"),
    "train-loss-curve": (
        "results/train_loss_curve.md",
        "python benchmarks/train_throughput.py --loss-curve 100 --batch-size 2 --seq-len 128 --threads 1 "
        f"{OLD_ROUTER} --out results/train_loss_curve.md",
    ),
    "train-throughput-bf16": (
        "results/train_throughput_bf16_2x128.md",
        "OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --threads 1 --repeats 2 --batch-size 2 "
        f"--seq-len 128 {OLD_ROUTER} --out results/train_throughput_bf16_2x128.md",
    ),
    "router-cost": (
        "results/router_cost.md",
        "OMP_NUM_THREADS=2 python benchmarks/router_cost.py --widths 144,0 --repeats 5 "
        "--scenarios decode_b1,prefill_1x1024 --out results/router_cost.md",
    ),
    "zeroshot": (
        "results/zeroshot.md",
        f"{OLD_DEMO} && python benchmarks/zeroshot_table.py --model runs/demo/routers --limit 100 --out runs/zeroshot "
        "&& cp runs/zeroshot/zeroshot.md results/zeroshot.md",
    ),
}


def fill(text: str, names=None) -> str:
    """``text`` with each section in ``names`` (default: all of ``SECTIONS``) replaced by its file."""
    for name in names or SECTIONS:
        path, command = SECTIONS[name]
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        if not pattern.search(text):
            continue
        src = ROOT / path
        if src.exists():
            body = f"Made by `{command}`:\n\n{src.read_text().strip()}"
        else:
            body = f"_not measured yet: run `{command}`_"
        text = pattern.sub(lambda m, b=body: f"{m.group(1)}{b}\n{m.group(2)}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    names = list(sys.argv[1:] if argv is None else argv) or None
    unknown = sorted(set(names or []) - set(SECTIONS))
    if unknown:
        print(f"error: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    readme = ROOT / "README.md"
    text = fill(readme.read_text(), names)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
