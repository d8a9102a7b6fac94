# Phi-3 LoRA Lab. `make run` executes the series, `make test` checks it; both create .venv first if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# make test's pytest-xdist workers: one runs the notebooks in order (tests/conftest.py), the other(s) the unit tests.
TEST_WORKERS ?= 2
# One torch thread per worker: two workers with torch's default two threads each on a 2-core machine took 18 min 26 s
# for make test here, one thread each 11 min 24 s (2026-12-03, quiet machine).
TEST_THREADS ?= 1

.PHONY: env run test test-real-shape test-colab notebooks data miniature experiments real-shape memory-table site test-site catch-up-results clean help

help:
	@echo "make run        execute chapters 00-09, two at a time where one does not read the other; results under outputs/"
	@echo "make test       unit tests + every chapter and solution through nbval (what a newcomer runs; <10 min)"
	@echo "make test-real-shape  every chapter on the Phi-3-Mini-shaped stand-in (~25 min; CI runs it after make test)"
	@echo "make test-colab the Colab bootstrap's real install into Colab's preinstalled versions (minutes; needs PyPI)"
	@echo "make notebooks  maintainers: re-execute notebooks/ in place after code changes"
	@echo "make data       regenerate data/ from its generator script"
	@echo "make miniature  maintainers: rebuild the shipped base in models/phi3-miniature/ (minutes, once)"
	@echo "make experiments chapter 08's full grid of runs (tens of minutes; resumes from outputs/experiments/)"
	@echo "make real-shape every chapter, short, on a Phi-3-Mini-shaped stand-in with PHI3_MODEL_ID (~15 min)"
	@echo "make memory-table maintainers: each chapter's peak memory on Phi-3 Mini, from two stand-in depths (~40 min)"
	@echo "make site       the workshop website from the stored notebooks (no re-execution): outputs/site/html/"
	@echo "make test-site  build the site and open every page in headless Chromium (tests/test_site.py)"
	@echo "make catch-up-results maintainers: refresh models/catch-up/ from a fresh miniature run of chapters 01-04"

env: $(STAMP)

$(STAMP): requirements.txt requirements-deploy.txt requirements-workshop.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

run: env
	$(PY) scripts/run_series.py

test: env
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -n $(TEST_WORKERS)

test-real-shape: env
	$(PY) -m pytest -m real_shape tests/test_real_shape.py

test-colab: env
	$(PY) -m pytest -m colab_install tests/test_colab_install.py

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

SITE_STAMP := $(VENV)/.site-installed

$(SITE_STAMP): requirements-site.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-site.txt
	touch $(SITE_STAMP)

site: $(SITE_STAMP)
	$(PY) scripts/build_site.py

test-site: $(SITE_STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ echo "make test-site: Chromium is not installed, so the browser tests would only be skipped (Debian: apt-get install chromium)"; exit 2; }
	$(PY) -m pytest tests/test_site.py -p no:nbval -o addopts="" -m site -q

catch-up-results: env
	$(PY) scripts/run_series.py --only 01 02 03 04
	$(PY) -m utils.catch_up store

clean:
	rm -rf outputs
