# Two commands do everything on a fresh machine (each sets up .venv first, idempotently):
#   make train   - a small real training run with the sharded cache under torchrun (2 ranks, CPU)
#   make test    - lint (make lint: ruff) and then the whole test suite
PY := .venv/bin/python

.PHONY: setup train lint test test-heavy bench study study-pretrained clean

setup:
	./scripts/setup.sh

train: setup
	$(PY) -m examples.code_search.compare

# lint errors and unsorted imports (rules and exceptions: [tool.ruff] in pyproject.toml)
lint: setup
	$(PY) -m ruff check .

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not heavy" tests

# The costliest variants (marked heavy: ~2 min), kept out of `make test` so that it stays under 10 minutes.
test-heavy: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m heavy tests

bench: setup
	$(PY) benchmarks/run_all.py

# The efficiency study (examples/efficiency/README.md): 6 methods x 3 seeds x 120 s, 2 ranks, ~40 min.
study: setup
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m examples.efficiency.study

# The study in the paper's regime (examples/efficiency/README.md): pretrained all-MiniLM-L6-v2 fine-tuned,
# zero-shot + 10 methods x 240 s, then 2 more seeds of the best cache method and the best baseline, 2 ranks,
# ~78 min on a quiet machine (--resume: a killed study goes on where it stopped).
study-pretrained: setup
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m examples.efficiency.pretrained --resume

clean:
	rm -rf .venv runs .pytest_cache
