# Set-up is automatic: every target creates and fills .venv (see .ci/bootstrap.py) and builds pyblend._C.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all test test-full bench lease build gpu-wheels clean

all: build

$(VENV)/.deps: .ci/bootstrap.py
	$(PYTHON) .ci/bootstrap.py
	@touch $@

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps --editable .
	@touch $@

build: $(VENV)/.built

# One pytest worker per core when pytest-xdist is there (worksteal: the slow interpreter tests vary from 0.1 s to
# 40 s); PYTEST_ARGS="-n 0" runs serially.
PARALLEL = $$($(PY) -c 'import xdist' 2>/dev/null && printf '%s' '--numprocesses=auto --dist=worksteal')

# The quick tier (what CI runs).
test: build
	$(PY) -m pytest $(PARALLEL) $(PYTEST_ARGS)

# Larger sweeps of every feature.
test-full: build
	$(PY) -m pytest $(PARALLEL) --full $(PYTEST_ARGS)

# The main job: every benchmark entry the device supports, on the default molecule set.
bench: build
	$(PY) -m pyblend bench $(BENCH_ARGS)

# One call on a lent GPU: the GPU tests, then the benchmark cases the open issues need, within a time budget
# (benchmarks/lease.py), e.g. LEASE_ARGS="--out DIR --budget-s 420".
lease: build
	$(PY) -m pyblend.benchmarks.lease $(LEASE_ARGS)

# Wheels the offline GPU machines lack (their python3 is 3.12): carry .whl/ with the device tool.
RDKIT_VERSION ?= 2026.9.1
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl rdkit==$(RDKIT_VERSION)

clean:
	rm -rf $(VENV) build *.egg-info pyblend/_C*.so
