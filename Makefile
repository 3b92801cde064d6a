# The two set-up commands (see README):
#   make train ARGS="data.path=../shared/data/multi30k"   # venv + pinned deps, then train
#   make test                                              # venv + pinned deps, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: venv train test lint bench-cell clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m mt.train $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check mt scripts benchmarks tests

bench-cell: $(STAMP)
	$(PY) benchmarks/bench_cell.py $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
