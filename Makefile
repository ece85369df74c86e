# The two commands README promises: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.camfn-installed

.PHONY: demo test lint bench notebooks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Pictures from the shipped shapes model and demo image (offline): every method in one grid, and one overlay.
demo: $(STAMP)
	$(BIN)/camfn explain --method all --out out/demo
	$(BIN)/camfn explain --method gradcam --scale 4 --npy --out out/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --doctest-modules camfn tests

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.speed

# Execute notebooks/src/*.py into notebooks/*.ipynb with their outputs (pictures); tests check they run.
notebooks: $(STAMP)
	$(BIN)/python notebooks/build.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
