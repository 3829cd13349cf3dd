# Quick start on a fresh machine: `make demo`, then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv install demo study test bench bench-quick bench-pytest clean

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
	$(VENV)/bin/metadd-fast demo --out demo_out

# The study of record (49 min on one core here, docs/study/; resumable: run it again after an interruption).
study: $(STAMP)
	$(VENV)/bin/metadd-fast study --out study_out

test: $(STAMP)
	$(PY) -m pytest -q tests

# The CSV of record (eager vs torch.compile vs fused, memory, bandwidth) and its plots;
# `make bench-pytest` runs the same cases through pytest-benchmark.
bench: $(STAMP)
	$(PY) benchmarks/run.py

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick

bench-pytest: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-columns=min,median,max,rounds

clean:
	rm -rf build *.egg-info metadd_fast/_C*.so $(VENV) demo_out study_out
