# The two commands of the README. Both create .venv if it is missing and install sliver into it.
SYSTEM_PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sliver-installed

.PHONY: setup compile test clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# Compile the default zoo model (DeiT-Tiny, 224x224) through the default pipeline to an x86 artifact.
compile: setup
	$(PY) tools/compile.py deit_tiny --pipeline fold-bn,cleanup --target x86 --out build/deit_tiny

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf build .pytest_cache
