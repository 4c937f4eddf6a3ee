# PrisMesh: two commands for a user (`make demo`, `make test`); each sets itself up.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prismesh-installed
NPM_STAMP := node_modules/.prismesh-installed
OUT    ?= out/demo

.PHONY: setup demo test test-faults lint clean figures

setup: $(STAMP) $(NPM_STAMP)
	@$(BIN)/python -m prismesh.chain.evm.toolchain install-bridge

# CPU torch is taken first by its exact version so that no multi-GB CUDA build is pulled on a CPU host.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet eth-brownie==1.22.2
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# `npm install --no-save` rather than `npm ci`: the lock pins every package this platform installs
# (with integrity hashes), while anvil's other-platform binaries are optional and may be absent from
# the registry mirror, which `npm ci` would refuse as an out-of-sync lock.
$(NPM_STAMP): package.json package-lock.json
	npm install --no-save --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup
	$(BIN)/prismesh demo --out $(OUT)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not campaign"

# The seeded 30-run fault campaign (SIGKILL of node, aggregator, committee or anvil mid-round).
test-faults: setup
	$(BIN)/python -m pytest -q -m campaign

# The figures docs/ quotes, regenerated from a run (the demo's report, the gas report).
figures: setup
	OMP_NUM_THREADS=1 $(BIN)/prismesh demo --out out/figures-demo
	mkdir -p docs/figures && cp out/figures-demo/report.md docs/figures/demo-report.md
	$(BIN)/prismesh gas-report

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf build .pytest_cache .ruff_cache out
