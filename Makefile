# Flywheel: every command a developer or CI needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV_VERSION := 0.13.8
export UV_PYTHON_DOWNLOADS := never
# After `pip install uv` the binary may not be on PATH yet (pyenv shims); its module always runs.
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")

.PHONY: help setup python-deps system-deps proto lint test demo up bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

python-deps:  ## install uv (if missing) and the pinned Python environment (.venv)
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	@$(UV) sync --frozen --all-packages --quiet

system-deps:  ## install PostgreSQL, Java 17 + Maven (Debian packages) and the Kafka jars
	@bash deploy/local/install.sh

setup: python-deps system-deps proto  ## everything `make test` and `make demo` need

proto: python-deps  ## generate Python code from proto/ into flywheel.contracts
	@PYTHON=.venv/bin/python bash scripts/gen_proto.sh

lint: python-deps proto  ## ruff (lint + format check) and mypy --strict
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy libs services tests bench conftest.py

test: setup  ## unit + integration tests; starts and stops PostgreSQL and Kafka itself
	$(UV) run pytest

demo: python-deps proto  ## the loop on the embedded default (for now: start, health-check, stop)
	$(UV) run flywheel demo

up: python-deps proto  ## run every service on loopback until Ctrl-C
	$(UV) run flywheel up

bench: setup  ## benchmarks (each prints a table and a JSON line)
	$(UV) run python bench/events.py
	$(UV) run python bench/ingest.py
	$(UV) run python bench/dataset_build.py
	$(UV) run python bench/train.py
	$(UV) run python bench/serve.py

clean:  ## remove local state (.flywheel/) and generated code
	rm -rf .flywheel libs/core/src/flywheel/contracts
