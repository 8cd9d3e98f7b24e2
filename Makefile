# Two commands do everything on a fresh machine (each sets up .venv first, idempotently):
#   make train   - a small real training run with the sharded cache under torchrun (2 ranks, CPU)
#   make test    - the whole test suite
PY := .venv/bin/python

.PHONY: setup train test bench study clean

setup:
	./scripts/setup.sh

train: setup
	$(PY) -m examples.code_search.compare

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/run_all.py

# The efficiency study (examples/efficiency/README.md): 6 methods x 3 seeds x 120 s, 2 ranks, ~40 min.
study: setup
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m examples.efficiency.study

clean:
	rm -rf .venv runs .pytest_cache
