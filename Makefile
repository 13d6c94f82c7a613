# moe-cpt: every target creates .venv itself on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := .venv-bench/.installed
STORE ?= data/store
WORKERS ?= 2

.PHONY: help venv shards study test test-fast lint bench bench-corpus bench-mixer bench-train s3 clean

help: ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so pip takes the CPU build from local disk; constraints.txt pins what is tested.
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[s3,train,dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv with everything installed

shards: $(STAMP) ## build the embedded demo datasets (prose, code) into ./data/store
	$(PY) -m moe_cpt.cli corpus demo --store $(STORE) --workers $(WORKERS)

STUDY ?= trainer/configs/study/demo.yaml
study: $(STAMP) ## run the demo study (prose -> code, docs/study.md) on the demo store; prints where its report is
	@$(PY) -m moe_cpt.cli corpus show prose@latest --store $(STORE) >/dev/null 2>&1 && \
	  $(PY) -m moe_cpt.cli corpus show code@latest --store $(STORE) >/dev/null 2>&1 || $(MAKE) shards
	$(PY) -m moe_cpt.cli study $(STUDY)

test: $(STAMP) ## run the whole test suite (slow end-to-end tests included)
	$(PY) -m pytest -q tests

test-fast: $(STAMP) ## run the tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP) ## ruff
	$(PY) -m ruff check .

bench: bench-corpus bench-mixer bench-train ## all benchmarks

BENCH_CORPUS_ARGS ?=
bench-corpus: $(STAMP) ## corpus pipeline tokens/s/core with/without dedup vs raw tokenizers and datatrove, scaling, RSS, dedup P/R
	$(PY) -m moe_cpt.cli bench corpus $(BENCH_CORPUS_ARGS)

# peers of the mixer bench in their own venv: their pins (numpy<2.2, torchvision) stay out of .venv
$(BENCH_STAMP):
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q --upgrade pip
	.venv-bench/bin/python -m pip install -q torch==2.13.0
	.venv-bench/bin/python -m pip install -q mosaicml-streaming litdata "numpy<2.2" zstandard xxhash fsspec
	touch $(BENCH_STAMP)

bench-mixer: $(STAMP) $(BENCH_STAMP) ## mixer tokens/s (warm cache, local S3), resume, RSS, I/O vs MosaicML Streaming, LitData; service vs in-process
	$(PY) -m moe_cpt.bench.mixer_bench --peers
	$(PY) -m moe_cpt.bench.service_bench

bench-train: $(STAMP) ## tokens/s of our trainer vs torchtitan's qwen3 MoE debug model
	$(PY) -m moe_cpt.bench.train_bench

s3: $(STAMP) ## start a local S3 endpoint on 127.0.0.1:9000 (foreground)
	$(PY) -m moe_cpt.infra.local_s3 --port 9000

clean: ## remove build outputs (keeps .venv)
	rm -rf data/store data/work .pytest_cache
