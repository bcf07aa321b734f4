# flowopd: every target sets itself up (venv + dependencies) when needed.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint format demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch: only when none is importable, and only the CPU build that lies on disk.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,ocr]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not benchmark" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

format: $(STAMP)
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

# The Flow-OPD pipeline on the embedded model, preset toy/demo (report: runs/demo/report/index.html)
demo: $(STAMP)
	$(BIN)/flowopd demo --out runs/demo

bench: $(STAMP)
	$(BIN)/python bench/epoch_time.py
	$(BIN)/python bench/opd_vs_grpo.py
	$(BIN)/python bench/full_size.py --size tiny

clean:
	rm -rf $(VENV) runs .pytest_cache
