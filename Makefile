# Quick start on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv install demo test bench clean

venv: $(STAMP)

# torch==2.13.0 is pinned for the test setup (a local CPU wheel here); the package
# itself only asks for torch>=2.3. The C++ extension builds against that torch.
$(STAMP): requirements-test.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m metadd_fast.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-columns=min,median,max,rounds \
		--benchmark-json=benchmarks/results/pytest_benchmark_cpu.json

clean:
	rm -rf build *.egg-info metadd_fast/_C*.so $(VENV)
