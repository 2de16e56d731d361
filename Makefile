# i2l — two commands: `make run` (toy world, end to end) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-fast lint deploy clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# uv installs (pip where uv cannot): infra/setup-venv.sh says how and why
	infra/setup-venv.sh $(PY) $(VENV)
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/i2l run --preset toy

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check i2l flows tests infra
	@# the package layers and who may import ray / duckdb / prefect / the CLI: .importlinter
	$(BIN)/lint-imports --no-cache

deploy: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" infra/prefect/deploy.sh

clean:
	rm -rf $(VENV)
