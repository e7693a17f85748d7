# `make demo` and `make test` each do all set-up on a fresh machine, then run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision with pip (not uv/poetry): this machine serves them from local disk
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# onnxruntime-gpu (runs on CPUs too) because nvidia-modelopt requires it; pytorch_wavelets imports pkg_resources, gone from setuptools 81
	$(PY) -m pip install -q "setuptools<81"
	$(PY) -m pip install -q -e ".[gpu,train,deploy,modelopt,bench,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmarks.demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs artifacts reports data/synthetic
