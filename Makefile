# tillsync — the two commands of the README:
#   make demo   set up everything and replay a real bakery's sales through two tills
#   make test   set up everything and run the tests (unit, integration, e2e)
#   make bench  measure throughput, latency and memory beside the raw limits (BENCH_ARGS=--quick: a smoke run)

VENV   ?= .venv
PYTHON ?= python3
# The team's reference data lies beside the repository (../shared/data), or where
# TILLSYNC_SHARED_DATA_DIR points; any other file of the same format: make demo INPUT=...
SHARED_DATA_DIR ?= $(or $(TILLSYNC_SHARED_DATA_DIR),../shared/data)
INPUT  ?= $(SHARED_DATA_DIR)/bakery_sales_2021-01.csv
BIN     = $(VENV)/bin

.PHONY: demo test bench install infra setup lint-topology clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

infra:
	scripts/infra.sh

setup: install infra
	$(BIN)/tillsync setup

demo: install infra
	@test -f "$(INPUT)" || { echo "demo input $(INPUT) not found: set INPUT=path/to/bakery_sales.csv (or TILLSYNC_SHARED_DATA_DIR)" >&2; exit 2; }
	$(BIN)/tillsync demo --input $(INPUT)

test: install infra
	$(BIN)/pytest

bench: install infra
	TILLSYNC_BENCH_VIA_MAKE=1 $(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf var/demo
