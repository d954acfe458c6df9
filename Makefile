# make setup: idempotent environment (.venv, pinned deps, apt packages)
# make demo:  set-up + demo corpora + shards + the whole UnFuSeD pipeline (configs/demo.yaml)
# make test:  set-up + the test suite (what .ci/run calls)
# make bench: set-up + the benchmarks' baselines (lhotse) + every benchmark (figures: benchmarks/RESULTS.md)
PY := .venv/bin/python
SIZE ?= demo
DATA := data/$(SIZE)
PYTEST_ARGS ?=

.PHONY: setup demo data test bench clean-runs

setup:
	@bash scripts/setup.sh

data: setup
	@bash scripts/make_data.sh $(SIZE)

demo: setup
	@bash scripts/make_data.sh demo
	$(PY) -m unfused_dist.cli run pipeline -c configs/demo.yaml $(ARGS)

test: setup
	.venv/bin/ruff check --select F,E9 --line-length 120 unfused_dist shards_tools launchers tests benchmarks
	$(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS)

bench: setup
	.venv/bin/pip install -q -c constraints.txt -r requirements-bench.txt
	@bash scripts/make_data.sh ci
	$(PY) benchmarks/shards_build.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/shard_reader.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/kmeans.py

clean-runs:
	rm -rf runs/
