.PHONY: setup demo test test-all lint

setup:
	bash scripts/setup.sh

demo: setup
	skipgpt demo

test: setup
	python3 -m pytest -q -m "not slow"

test-all:
	python3 -m pytest -q

lint:
	ruff check src tests benchmarks && ruff format --check src tests benchmarks
