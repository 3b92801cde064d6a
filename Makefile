# The two set-up commands (see README):
#   make train ARGS="data.path=/path/to/multi30k"         # venv + pinned deps, then train
#   make test                                              # venv + pinned deps, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: venv browser train test lint format bench-cell clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m mt.train $(ARGS)

# tests/test_browser.py drives the system chromium. Where it is missing and we may install it (root
# with apt-get, as in CI), install it quietly; this never fails the target: without it the test skips.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium for tests/test_browser.py (apt-get)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && \
		    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } || \
		echo "chromium could not be installed: tests/test_browser.py will skip"; \
	fi

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check mt scripts benchmarks tests
	$(VENV)/bin/ruff format --check mt scripts benchmarks tests

format: $(STAMP)
	$(VENV)/bin/ruff format mt scripts benchmarks tests

bench-cell: $(STAMP)
	$(PY) benchmarks/bench_cell.py $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
