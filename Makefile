# The two commands of the README. Each sets everything up first (idempotent), then runs.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup repro test lint

setup:
	bash scripts/setup.sh

# The main job: the whole pipeline on the embedded default profile (params.yaml).
repro: setup
	dvc repro

# The test suite (what CI runs): lint, then pytest.
test: setup
	ruff check common tests benchmarks scripts papers
	ruff format --check --quiet common tests benchmarks scripts papers
	pytest -q

lint: setup
	ruff check common tests benchmarks scripts papers
