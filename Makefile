# Shipment tracking service. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Hashed lock files, written by `make lock` and checked against pyproject.toml by `make lock-check`:
# requirements.lock for the image, requirements-dev.lock (every extra too) for this venv.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
# uv only resolves the locks (`make lock`); installs need nothing but pip.
UV_VERSION := 0.13.9
UV := $(BIN)/uv
UV_COMPILE := $(UV) pip compile --quiet --no-config --universal --generate-hashes \
	--index-url https://pypi.org/simple --custom-compile-command 'make lock'

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --requirement $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --editable .
	@touch $@

.PHONY: install
install: $(INSTALLED) ## create the virtual environment and install the service with its tools

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)

# Existing pins are kept where pyproject still allows them; UPGRADE=1 takes the newest releases.
# The image's lock starts from the dev lock's pins, so the two agree on what they share.
.PHONY: lock
lock: $(UV) ## re-resolve the lock files from pyproject.toml on PyPI (UPGRADE=1: newest releases)
	reqs="$$($(PYTHON) .ci/check_lock.py --installer-requirements)" && \
	  printf '%s\n' "$$reqs" | $(UV_COMPILE) --all-extras $(if $(UPGRADE),--upgrade) \
	    --output-file $(DEV_LOCK) pyproject.toml - && \
	  cp $(DEV_LOCK) $(LOCK) && \
	  printf '%s\n' "$$reqs" | $(UV_COMPILE) --output-file $(LOCK) pyproject.toml -
	$(PYTHON) .ci/check_lock.py --stamp
	$(MAKE) lock-check

.PHONY: lock-check
lock-check: $(INSTALLED) ## fail when pyproject.toml and the lock files disagree (offline)
	$(BIN)/python .ci/check_lock.py

.PHONY: run
run: $(INSTALLED) ## everything, in the foreground: embedded PostgreSQL, simulator, API, dispatcher
	$(BIN)/python -m service run

.PHONY: browser
browser: ## Debian's chromium for the dashboard's browser tests, best effort (never fails)
	@[ -x /usr/bin/chromium ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  >/dev/null 2>&1 || echo "no browser: the dashboard's browser tests will be skipped"

.PHONY: wrk
wrk: ## Debian's wrk, the benchmarks' HTTP load generator, best effort (never fails)
	@command -v wrk >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) \
	  >/dev/null 2>&1 || echo "no wrk: the wrk suite and its test will be skipped"

.PHONY: test
test: $(INSTALLED) browser wrk ## the whole suite, on TEST_DATABASE_URL's server or an embedded one
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
bench: $(INSTALLED) wrk ## benchmarks, as ratios to a baseline of the same run (BENCH_ARGS='dispatch --quick')
	$(BIN)/python -m bench $(BENCH_ARGS)

.PHONY: clean
clean: ## remove the virtual environment, the embedded database and caches
	rm -rf $(VENV) .data .mypy_cache .ruff_cache .pytest_cache
