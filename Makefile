# One command to set up and run the app, one to run the tests (README).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU, pin the CPU build of torch (pip otherwise takes a multi-GB CUDA build).
TORCH_CONSTRAINTS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,-c .ci/constraints.txt)

$(VENV)/.installed: requirements.txt .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install $(TORCH_CONSTRAINTS) -r requirements.txt
	touch $@

.PHONY: setup run test test-all
setup: $(VENV)/.installed

run: setup
	$(PY) app.py $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

test-all: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
