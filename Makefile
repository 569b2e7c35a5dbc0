# The few commands a developer needs; each works after `bash scripts/setup.sh`.
PY := .venv/bin/python

.PHONY: setup test lint demo bench

setup:
	bash scripts/setup.sh

test:
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .
	$(PY) -m mypy mixer_service client trainer --ignore-missing-imports

demo:
	$(PY) -m mixer_demo

bench:
	$(PY) bench/bench_engine.py --loader-workers 2
	$(PY) bench/bench_service.py
	$(PY) bench/bench_prepare.py
	$(PY) bench/bench_store.py
	$(PY) bench/bench_latency.py
	$(PY) bench/bench_doc_index.py
