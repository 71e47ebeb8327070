# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Repeat the torch pins in every pip call so nothing swaps torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e . $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) sample.py --predictor_path exps/digits/uniform-start-nfe9.pkl --seeds 0-63 --grid --outdir samples/digits
	@echo "Images: samples/digits/ (per-seed PNGs with JSON sidecars) and the grid samples/digits/grid.png"

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m solvers.bench --model gmm --num-samples 2000 --json docs/bench/gmm.json
	$(PY) -m solvers.bench --model digits --num-samples 2000 --json docs/bench/digits.json

clean:
	rm -rf samples .cache .pytest_cache
