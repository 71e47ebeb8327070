# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Repeat the torch pins in every pip call so nothing swaps torch.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench distill rdpo-demo install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e . $(TORCH_PINS)
# k-diffusion, for the parity tests of solvers/k_diffusion.py only (that module never imports it). --no-deps:
# its metadata asks for its training extras (wandb, kornia, clip-anytorch, clean-fid, scikit-image, ...), while
# k_diffusion.sampling/.external need only torchsde, torchdiffeq (pinned in pyproject.toml), scipy, pillow,
# safetensors and torchvision (docs/backends/k_diffusion.md).
	$(PY) -m pip install --quiet --no-deps k-diffusion==0.1.1.post1 $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) sample.py --predictor_path exps/digits/epd-nfe9.pkl --seeds 0-63 --grid --outdir samples/digits
	@echo "Images: samples/digits/ (per-seed PNGs with JSON sidecars) and the grid samples/digits/grid.png"

test: $(VENV)/.installed
	$(PY) -m pytest -q

BENCH := --schedules polynomial,logsnr,time_uniform --solvers ipndm,dpmpp3m,dpmpp2m,unipc,dpm2,heun,euler \
	--nfe 3,4,5,6,7,8,9,10,11,14 --num-samples 2000
bench: $(VENV)/.installed
	for m in gmm digits; do OMP_NUM_THREADS=1 $(PY) -m solvers.bench --model $$m $(BENCH) --json docs/bench/$$m.json \
		$$(for n in 3 5 7 9; do printf -- '--table epd-nfe%s=exps/%s/epd-nfe%s.pkl ' $$n $$m $$n; done) || exit 1; done

# Recipe search and re-distillation of the analytic models' tables (2-6 min each on 2 CPU cores; a table is replaced
# only when the new one scores better on the validation trajectories, docs/distill/recipe.md).
distill: $(VENV)/.installed
	for m in gmm digits; do for n in 3 5 7 9; do \
		OMP_NUM_THREADS=1 $(PY) -m training.distill.launch --config configs/distill/$$m-nfe$$n.yaml --search || exit 1; done; done

# RDPO (Stage 2) on the digits model: 9 short runs and the report in docs/rdpo/ (about 3 minutes on 2 CPU cores).
rdpo-demo: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) scripts/rdpo_digits_demo.py

clean:
	rm -rf samples .cache .pytest_cache
