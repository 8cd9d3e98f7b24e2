# Two commands do everything on a fresh machine (each sets up .venv first, idempotently):
#   make train   - a small real training run with the sharded cache under torchrun (2 ranks, CPU)
#   make test    - the whole test suite
PY := .venv/bin/python

.PHONY: setup train test bench clean

setup:
	./scripts/setup.sh

train: setup
	$(PY) -m examples.code_search.compare

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .venv runs .pytest_cache
