# qsmlab: every target creates .venv on demand (torch==2.13.0 first: it is a local CPU wheel; a bare
# `torch` would make pip download a multi-GB CUDA build), then installs the project.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXP    ?= uqsm_tv
PYTEST_ARGS ?= -m "not slow"
QSMLAB := $(VENV)/bin/qsmlab
# extra arguments per target, e.g. make sweep EXP=uqsm_tv SWEEP_ARGS="--workers 1 --n-trials 4"
SWEEP_ARGS ?=
FIT_ARGS ?=
LOOCV_ARGS ?=
MANIFEST ?=
RUNS ?= $(wildcard runs/*)
REPORT ?= reports/latest
STUDY ?= $(EXP)
STORAGE ?=
PORT ?= 8080

.PHONY: venv lock test-latest test test-all lint bench sweep fit loocv compare dashboard clean help

help:
	@echo "make sweep EXP=uqsm_tv   Optuna study of sweeps/EXP.yaml (W&B run per trial, report in runs/EXP/)"
	@echo "make fit EXP=uqsm_tv     train experiments/EXP.yaml (quick profile; FIT_ARGS='--profile full ...')"
	@echo "make loocv EXP=uqsm_tv [MANIFEST=m.csv]  leave-one-subject-out batch with TKD/TV baselines (no MANIFEST: demo)"
	@echo "make compare [RUNS='runs/a runs/b'] [REPORT=dir]   tables and figures from the CSV logs"
	@echo "make dashboard [STUDY=uqsm_tv] [STORAGE=url]        optuna-dashboard on localhost:$(PORT)"
	@echo "make test                fast test suite (creates .venv from requirements.lock if missing)"
	@echo "make lock                regenerate requirements.lock (pip-tools, hashes)"
	@echo "make test-latest         fast suite in a throw-away venv of the newest releases (drift check)"
	@echo "make test-all            every test, slow ones included"
	@echo "make lint                ruff"
	@echo "make bench               benchmarks/*.py (print ratios and medians)"

venv: $(STAMP)

# Installs come from the committed lock (requirements.lock, hashes checked), so a fresh machine gets
# the versions the tests were run with. torch in the lock is the CPU wheel 2.13.0+cpu (found through the
# machine's pip find-links, or https://download.pytorch.org/whl/cpu elsewhere). The project itself is
# installed without build isolation so its build backend comes from the lock too.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --require-hashes -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Regenerate the lock from pyproject.toml's ranges and requirements/pins.in (pip-tools in a throw-away venv).
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q pip-tools
	.lockenv/bin/pip-compile -q --upgrade --extra dev --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml requirements/pins.in
	rm -rf .lockenv

# Not in CI: a throw-away venv from the newest releases the pyproject ranges allow (torch stays the local
# CPU wheel), running the fast suite, so dependency drift is seen before a lock update meets it.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install -q torch==2.13.0
	.venv-latest/bin/pip install -q --upgrade -e ".[dev]"
	.venv-latest/bin/pip freeze | grep -iE '^(numpy|scipy|lightning|torchio|monai|optuna|wandb|nibabel|jsonargparse)=='
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; rm -rf .venv-latest; exit $$rc

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check qsmlab tests benchmarks

bench: $(STAMP)
	@for b in bench_physics bench_recon bench_data bench_metrics; do \
		echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done

sweep: $(STAMP)
	$(QSMLAB) sweep sweeps/$(EXP).yaml $(SWEEP_ARGS)

fit: $(STAMP)
	$(QSMLAB) fit $(EXP) $(FIT_ARGS)

# Without MANIFEST: the embedded demo (4 in-vivo-like heads as BIDS -> qsmlab bids -> held out one at a
# time beside the synthetic rows; qsmlab/lab/loocv_demo.py), results in runs/loocv-$(EXP)-demo/.
loocv: $(STAMP)
	$(QSMLAB) loocv $(EXP) $(if $(MANIFEST),--manifest $(MANIFEST),--demo) $(LOOCV_ARGS)

compare: $(STAMP)
	@test -n "$(RUNS)" || { echo "make compare: no runs/ yet; run make fit or make sweep first, or give RUNS=..." >&2; exit 2; }
	$(QSMLAB) compare $(RUNS) -o $(REPORT)

dashboard: $(STAMP)
	@$(PY) -c "import optuna_dashboard" 2>/dev/null || $(PY) -m pip install -q -e ".[dashboard]"
	$(VENV)/bin/optuna-dashboard $(if $(STORAGE),$(STORAGE),runs/$(STUDY)/journal.log) --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
