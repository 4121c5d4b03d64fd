# Two commands do all set-up: `make test` and `make reproduce` (then `make compare`); `make lab` opens the notebooks.
# TORCH is installed as pip resolves it (a CPU wheel where the index serves one; from PyPI on Linux a CUDA
# build). To choose, install your torch build into .venv first (e.g. `.venv/bin/pip install torch --index-url
# <PyTorch's CPU or CUDA wheel index>`) and set TORCH=.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PROFILE ?= default
# PLAN: quick | full, how much of notebooks 04-06's studies to run; empty: quick under the default profile
PLAN ?=
# OUT: where `make reproduce` writes its notebooks, results, figures and runs; `.` (= `make publish`)
# writes over the committed notebooks/, results/ and figures/, with the runs in results/runs (their
# configs, histories, metrics and per-user ranks are committed, checkpoints are not: *.pt is ignored)
OUT ?= reproduce
# RTOL: relative tolerance of `make compare` (0: the same numbers)
RTOL ?= 0
STAMP := $(VENV)/.installed
# the Jupyter kernel the notebooks name ("m3bsr"), installed inside .venv
KERNEL := $(VENV)/share/jupyter/kernels/m3bsr/kernel.json
comma := ,

.PHONY: install test reproduce notebooks publish compare lab clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(KERNEL): $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name m3bsr --display-name "m3bsr (.venv)" >/dev/null

install: $(STAMP) $(KERNEL)

# Notebooks, run in order. `make reproduce` executes each on PROFILE and PLAN into OUT (default
# reproduce/, git-ignored: notebooks, results, figures and runs), so the committed study is never
# overwritten; `make compare` then checks OUT's tables against the committed ones. `make publish`
# (OUT=. and the full plan, hours on a CPU) rewrites the committed notebooks, tables and figures.
# `make test` copies the notebooks to build/notebooks with the ci parameters injected (papermill
# --prepare-only: parameters applied, nothing executed), nbval (--nbval-lax) executes each copy once
# without comparing outputs (the statistics they show are pinned in tests/), then the figures it wrote are checked.
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PAPERMILL := $(PY) -m papermill --log-level WARNING
NB_BUILD := build
NB_CI := -p profile ci -p figures_dir $(NB_BUILD)/figures -p results_dir $(NB_BUILD)/results -p runs_dir $(NB_BUILD)/runs
NB_OUT := $(if $(filter .,$(OUT)),-p runs_dir results/runs,-p figures_dir $(OUT)/figures -p results_dir $(OUT)/results -p runs_dir $(OUT)/runs)

test: install
	rm -rf $(NB_BUILD)/notebooks $(NB_BUILD)/figures $(NB_BUILD)/results $(NB_BUILD)/runs
	mkdir -p $(NB_BUILD)/notebooks
	for nb in $(NOTEBOOKS); do $(PAPERMILL) --no-progress-bar --prepare-only $$nb $(NB_BUILD)/notebooks/$$(basename $$nb) $(NB_CI) || exit 1; done
	$(PY) -m pytest tests $(NB_BUILD)/notebooks --nbval-lax --nbval-current-env
	M3BSR_CI_BUILD=$(NB_BUILD) $(PY) -m pytest tests/test_notebooks.py -k ci_run_wrote_figures

notebooks: install
	mkdir -p $(OUT)/notebooks
	for nb in $(NOTEBOOKS); do echo "papermill $$nb -> $(OUT)/notebooks (profile $(PROFILE)$(if $(PLAN),$(comma) plan $(PLAN)))"; \
		$(PAPERMILL) --progress-bar $$nb $(OUT)/notebooks/$$(basename $$nb) -p profile $(PROFILE) $(if $(PLAN),-p plan $(PLAN)) $(NB_OUT) || exit 1; done

reproduce: notebooks

publish:
	$(MAKE) notebooks OUT=. PLAN=$(or $(PLAN),full)

compare: install
	$(PY) -m m3bsr.viz compare $(OUT)/results results --rtol $(RTOL)

lab: install
	$(PY) -m jupyter lab notebooks

clean:
	rm -rf runs data/cache
