# Shipment tracking service. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[dev]'
	@touch $@

.PHONY: install
install: $(INSTALLED) ## create the virtual environment and install the service with its tools

.PHONY: run
run: $(INSTALLED) ## everything, in the foreground: embedded PostgreSQL, simulator, API, dispatcher
	$(BIN)/python -m service run

.PHONY: browser
browser: ## Debian's chromium for the dashboard's browser tests, best effort (never fails)
	@[ -x /usr/bin/chromium ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  >/dev/null 2>&1 || echo "no browser: the dashboard's browser tests will be skipped"

.PHONY: test
test: $(INSTALLED) browser ## the whole suite, on TEST_DATABASE_URL's server or an embedded one
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: check
check: $(INSTALLED) ## lint, format check and strict type check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

.PHONY: format
format: $(INSTALLED) ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

.PHONY: migrate
migrate: $(INSTALLED) ## apply the migrations to DATABASE_URL
	$(BIN)/python -m service migrate

.PHONY: simulator
simulator: $(INSTALLED) ## serve the ShipEngine simulator alone (port 8090)
	$(BIN)/python -m service simulator

.PHONY: bench
bench: $(INSTALLED) ## benchmarks, as ratios to a baseline of the same run (BENCH_ARGS='dispatch --quick')
	$(BIN)/python -m bench $(BENCH_ARGS)

.PHONY: clean
clean: ## remove the virtual environment, the embedded database and caches
	rm -rf $(VENV) .data .mypy_cache .ruff_cache .pytest_cache
