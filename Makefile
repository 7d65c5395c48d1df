# hasten: `make test` builds (or reuses) .venv and runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines: pin the local CPU wheel so no multi-GB CUDA build is pulled.
# On a CUDA machine run `make test TORCH_SPEC=torch` (or any spec you like).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test demo bench lint bench-solvers clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# The main job on the bundled default: every quick-preset configuration against the diffusers peers.
bench: venv
	$(VENV)/bin/hasten bench --preset quick --model mnist-dit --out bench-out --resume

demo: venv
	$(PY) examples/analytic_mixture.py

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts examples
	$(VENV)/bin/ruff format --check src tests benchmarks scripts examples

bench-solvers: venv
	$(PY) benchmarks/solver_overhead.py --out benchmarks/results/solver_overhead.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
