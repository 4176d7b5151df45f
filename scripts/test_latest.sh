#!/usr/bin/env bash
# A throw-away environment with the newest versions pyproject.toml allows (not the lock), then
# the fast suite: a new transformers/peft/datasets/... release that breaks skipgpt shows up here
# before users see it. torch stays at the lock's build (the newest CUDA build is several GB).
# Prints the versions that differ from the lock. Usage: make test-latest [PYTEST_ARGS=...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=$(mktemp -d /tmp/skipgpt-latest.XXXXXX)
trap 'rm -rf "$venv"' EXIT
$PY -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "$(grep '^torch==' requirements.lock)" 2>/dev/null ||
  "${pip[@]}" "$(grep '^torch==' requirements.lock)" --extra-index-url https://download.pytorch.org/whl/cpu
"${pip[@]}" --upgrade -e ".[eval,dev]"
echo "test-latest: versions that differ from requirements.lock:"
norm() { tr 'A-Z_' 'a-z-' | sort; }
"$venv/bin/python" -m pip freeze --exclude-editable | norm >"$venv/freeze.txt"
grep '==' requirements.lock | norm | comm -13 - "$venv/freeze.txt" | sed 's/^/  /' || true
PYTHON="$venv/bin/python" bash scripts/install_assets.sh
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider ${PYTEST_ARGS:-}
