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

# Every benchmark table in README (about 55 minutes on 2 cores); each writes benchmarks/results/*.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.perturbation --methods score --markdown > benchmarks/results/perturbation.md
	$(BIN)/python -m benchmarks.speed --kind fast --models resnet18 resnet50 --batches 1 8 --markdown
	$(BIN)/python -m benchmarks.speed --kind slow --models resnet18 --markdown benchmarks/results/speed-slow.md
	$(BIN)/python -m benchmarks.speed --methods fullgrad shapleycam --models resnet50 --batches 8 --repeats 2 --markdown benchmarks/results/fullgrad-shapleycam.md
	$(BIN)/python -m benchmarks.compile --models resnet18 resnet50 --markdown
	$(BIN)/python -m benchmarks.overhead --before 0dce887 --calls 200 --markdown
	$(BIN)/python -m benchmarks.score_sizes --markdown
	$(BIN)/python -m benchmarks.legrad_depth --markdown
	$(BIN)/python -m benchmarks.scaling --markdown
	$(BIN)/python -m benchmarks.quality --n 256 --steps 16 --markdown benchmarks/results/quality.md

# Execute notebooks/src/*.py into notebooks/*.ipynb with their outputs (pictures); tests check they run.
notebooks: $(STAMP)
	$(BIN)/python notebooks/build.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
