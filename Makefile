# `make demo` and `make test` build .venv themselves; override TORCH_SPEC for a CUDA build,
# e.g. `make test TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cu124'`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo demo-full test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The stamp is refreshed when pyproject.toml or the Makefile changes, so `make` stays idempotent.
$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/lmforge quickstart

# Every stage (crawl, clean, tokenize, pretrain, SFT, DPO, eval, serve) in about ten minutes; see runs/quickstart-full/report.md.
demo-full: venv
	$(BIN)/lmforge quickstart --full

# lint-imports checks the layers contract in pyproject.toml (imports run one way) before the suite runs.
# Two pytest workers, a test file each at a time (module fixtures stay in one process): much of the suite waits
# on subprocesses and servers, so two workers on two cores finish well before one.
test: venv
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# The peers the benchmarks compare against (TRL, datasketch, datatrove) come with the bench extra.
bench: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/pretrain_cpu.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
