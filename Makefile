# Set-up is automatic: every target creates and fills .venv (see .ci/bootstrap.py) and builds pyblend._C.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all test test-full test-gpu bench build clean

all: build

$(VENV)/.deps: .ci/bootstrap.py
	$(PYTHON) .ci/bootstrap.py
	@touch $@

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps --editable .
	@touch $@

build: $(VENV)/.built

# The quick tier (what CI runs).
test: build
	$(PY) -m pytest $(PYTEST_ARGS)

# Larger sweeps of every feature.
test-full: build
	$(PY) -m pytest --full $(PYTEST_ARGS)

# The main job: every benchmark entry the device supports, on the default molecule set.
bench: build
	$(PY) -m pyblend bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info pyblend/_C*.so
