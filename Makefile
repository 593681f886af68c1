# Development set-up in one command each (a fresh machine needs only python3 >= 3.10):
#   make quickstart   create .venv, install, train configs/quickstart.yaml on the shapes world (shapes-sd)
#   make test         create .venv, install, run the whole test suite (what CI runs)
# TORCH pins the torch pair this machine's pip takes from local disk; on a GPU machine use e.g.
#   make test TORCH="torch torchvision"

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
# One pytest worker per CPU (pytest-xdist); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= auto
PY := $(VENV)/bin/python

.PHONY: install quickstart test bench

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/diffalign train configs/quickstart.yaml --overwrite

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(VENV)/.installed
	$(PY) bench/dpo_step.py
