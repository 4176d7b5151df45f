#!/usr/bin/env bash
# Refresh requirements.lock (exact versions of everything `pip install -e ".[eval,dev]"` needs,
# torch's CPU build included) with uv's resolver. Run it as `make lock`, then `make test`
# (and `make test-latest`) before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.13.0+cpu}
$PY -m pip install -q "uv==0.13.9"
# The CPU build of torch: a local wheel folder where the machine has one (/opt/wheels here),
# else PyTorch's CPU index.
if compgen -G "/opt/wheels/torch-${TORCH}-*.whl" >/dev/null; then
  source=(--find-links /opt/wheels)
else
  source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
$PY -m uv pip compile -q pyproject.toml --extra eval --extra dev \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  "${source[@]}" --constraint <(echo "torch==${TORCH}") \
  --no-emit-find-links --custom-compile-command "make lock" \
  --output-file requirements.lock
