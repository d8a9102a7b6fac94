# Phi-3 LoRA Lab. `make run` executes the series, `make test` checks it; both create .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: env run test notebooks data miniature experiments real-shape memory-table clean help

help:
	@echo "make run        execute chapters 00-09 in order; results under outputs/"
	@echo "make test       unit tests + every notebook through nbval (what CI runs)"
	@echo "make notebooks  maintainers: re-execute notebooks/ in place after code changes"
	@echo "make data       regenerate data/ from its generator script"
	@echo "make miniature  maintainers: rebuild the shipped base in models/phi3-miniature/ (minutes, once)"
	@echo "make experiments chapter 08's full grid of runs (tens of minutes; resumes from outputs/experiments/)"
	@echo "make real-shape every chapter, short, on a Phi-3-Mini-shaped stand-in with PHI3_MODEL_ID (~15 min)"
	@echo "make memory-table maintainers: each chapter's peak memory on Phi-3 Mini, from two stand-in depths (~30 min)"

env: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: env
	$(PY) scripts/run_series.py

test: env
	$(PY) -m pytest

notebooks: env
	PHI3_LAB_EXPERIMENTS=full $(PY) scripts/run_series.py --in-place --solutions

data: env
	$(PY) data/generate_house_format.py

miniature: env
	$(PY) -m utils.miniature build

experiments: env
	PHI3_LAB_EXPERIMENTS=full $(PY) scripts/run_series.py --only 08

real-shape: env
	$(PY) scripts/smoke_real_shape.py

memory-table: env
	$(PY) bench/memory_by_depth.py

clean:
	rm -rf outputs
