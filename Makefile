# Two commands do all set-up: `make test` and `make reproduce`.
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
STAMP := $(VENV)/.installed
comma := ,

.PHONY: install test reproduce notebooks clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# Notebooks, run in order. `make reproduce` executes each in place on PROFILE and PLAN, so the
# committed notebooks (`make reproduce PLAN=full`, hours on a CPU) carry real outputs. `make test`
# copies them to build/notebooks with the ci parameters injected (papermill --prepare-only:
# parameters applied, nothing executed, stored outputs kept for the `# NBVAL_CHECK_OUTPUT` cells),
# nbval executes each copy once, then the figures it wrote are checked.
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PAPERMILL := $(PY) -m papermill --no-progress-bar --log-level WARNING
NB_BUILD := build
NB_CI := -p profile ci -p figures_dir $(NB_BUILD)/figures -p results_dir $(NB_BUILD)/results -p runs_dir $(NB_BUILD)/runs

test: $(STAMP)
	rm -rf $(NB_BUILD)/notebooks $(NB_BUILD)/figures $(NB_BUILD)/results $(NB_BUILD)/runs
	mkdir -p $(NB_BUILD)/notebooks
	for nb in $(NOTEBOOKS); do $(PAPERMILL) --prepare-only $$nb $(NB_BUILD)/notebooks/$$(basename $$nb) $(NB_CI) || exit 1; done
	$(PY) -m pytest tests $(NB_BUILD)/notebooks --nbval-lax --nbval-current-env
	M3BSR_CI_BUILD=$(NB_BUILD) $(PY) -m pytest tests/test_notebooks.py -k ci_run_wrote_figures

notebooks: $(STAMP)
	for nb in $(NOTEBOOKS); do echo "papermill $$nb (profile $(PROFILE)$(if $(PLAN),$(comma) plan $(PLAN)))"; $(PAPERMILL) $$nb $$nb -p profile $(PROFILE) $(if $(PLAN),-p plan $(PLAN)) || exit 1; done

reproduce: notebooks

clean:
	rm -rf runs data/cache
