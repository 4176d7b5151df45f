#!/usr/bin/env bash
# The frontier of issue 18 on SmolLM2-135M: four router variants against ShortGPT, LLM-Drop and
# the static substitute baseline, all timed against the dense model in the same run.
#
#   rt100-params25     decoupled (attention and MLP routers), plain skipping, router d/4 (the old default)
#   rt100-adapter      decoupled, a skipped MLP runs its closed-form rank-36 substitute, router d/4
#   rt100-mlponly      attention always runs (HeRo style), MLP -> substitute, router d/4
#   rt100-mlponly-lin  the same with a linear router (one GEMM per layer at inference)
#   rt100-lin          decoupled, plain skipping, linear router
#   rt100-adapter-lin  decoupled, MLP -> closed-form rank-36 substitute, linear router
#
# Every variant: the default recipe, 100 steps of 4x256 tokens of `calib` (the same token budget),
# then θ calibrated on 16 blocks. Router sets already trained are kept. About 35 min per variant
# (two or three at once share the 2 cores: about 40-55 min), then about 65 min of frontier on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--model smollm2-135m --dataset calib --max-steps 100 --batch-size 4)
sub=(--mlp-skip-to adapter --substitute-init closed-form)
train() {  # name, flags...
  local name=$1; shift
  [[ -f runs/$name/skipgpt_config.json ]] || skipgpt train-router "${common[@]}" "$@" --output "runs/$name"
}
train rt100-params25 --budget params --target-sparsity 0.25 --router-hidden 144
train rt100-adapter "${sub[@]}" --budget params --target-sparsity 0.25 --router-hidden 144
train rt100-mlponly "${sub[@]}" --modules mlp --budget modules --target-sparsity 0.35 --router-hidden 144
train rt100-mlponly-lin "${sub[@]}" --modules mlp --budget modules --target-sparsity 0.35 --router-hidden 0
train rt100-lin --budget params --target-sparsity 0.25 --router-hidden 0
train rt100-adapter-lin "${sub[@]}" --budget params --target-sparsity 0.25 --router-hidden 0
OMP_NUM_THREADS=2 skipgpt frontier --model smollm2-135m \
  --routers runs/rt100-params25 --routers runs/rt100-adapter --routers runs/rt100-mlponly \
  --routers runs/rt100-mlponly-lin --routers runs/rt100-lin --routers runs/rt100-adapter-lin \
  --thetas 0.3,0.5,0.65,0.8,0.9,0.95,0.98,0.995 --max-layers 10 --max-windows 4 --repeats 3 \
  --scenarios prefill_1x1024,decode_b1 --decode-steps 16 --decode-context 128 --statistic min \
  --output runs/frontier3
cp runs/frontier3/frontier.md runs/frontier3/frontier.json runs/frontier3/frontier.png results/
