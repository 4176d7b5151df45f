#!/usr/bin/env bash
# Issue 18's frontier with routers tuned around deleted layers (`train-router --remove-layers K`):
# ShortGPT's K lowest-influence layers go first (static, no per-layer cost left), routers decide
# per token on the other layers. Beside them: the demo's routers, the frontier recipe at 25% and
# 35% for 300 steps, ShortGPT, LLM-Drop and the static substitute baseline, all timed against the
# dense model in the same run.
#
#   rt22-drop3   -3 layers (10% of the parameters), routers to 22% in all
#   rt30-drop6   -6 layers (20%), routers to 30% in all
#
# Both: the frontier recipe, 110 steps of 8x256 tokens of `calib` (the demo's token budget), the
# full model as distillation teacher. Router sets already trained are kept; so are the finished
# points of runs/frontier-final (the frontier-300 run, same settings): `skipgpt frontier` keeps them
# when a rerun only adds router sets, and measures each new point against dense timed beside it.
# About 45 min per router set on 2 cores (two at once with OMP_NUM_THREADS=1: about 45 min for
# both), then about 10 min of frontier per new router set.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f runs/demo/routers/skipgpt_config.json ]] || skipgpt demo --output runs/demo
train() {  # name, flags...
  local name=$1; shift
  [[ -f runs/$name/skipgpt_config.json ]] || skipgpt train-router --model smollm2-135m --recipe frontier \
    --batch-size 8 --seq-len 256 "$@" --output "runs/$name"
}
train rt25-frontier-300 --target-sparsity 0.25 --max-steps 300
train rt35-frontier-300 --target-sparsity 0.35 --max-steps 300
train rt22-drop3 --remove-layers 3 --target-sparsity 0.22 --max-steps 110
train rt30-drop6 --remove-layers 6 --target-sparsity 0.30 --max-steps 110
out=runs/frontier-hybrid
if [[ ! -d $out && -f runs/frontier-final/frontier.progress.json ]]; then
  mkdir -p "$out" && cp runs/frontier-final/frontier.progress.json "$out/"
fi
OMP_NUM_THREADS=2 skipgpt frontier --model smollm2-135m \
  --routers runs/demo/routers --routers runs/rt25-frontier-300 --routers runs/rt35-frontier-300 \
  --routers runs/rt22-drop3 --routers runs/rt30-drop6 \
  --thetas 0.5,0.8,0.9,0.95 --max-layers 9 --baselines shortgpt,llm-drop,substitute --max-windows 4 \
  --repeats 3 --scenarios prefill_1x1024,decode_b1 --statistic min --output "$out"
cp "$out/frontier.md" results/frontier_hybrid.md
cp "$out/frontier.json" results/frontier_hybrid.json
cp "$out/frontier.png" results/frontier_hybrid.png
