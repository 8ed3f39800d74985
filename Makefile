# One target per stage; `make demo` or `make test` builds the environments first (`make setup`, which
# skips an environment that is up to date).
RECIPE ?= recipes/viggo-cpu.yaml
VENVS ?= .venvs
TRAIN_PY := $(VENVS)/train/bin/python
SERVE_PY := $(VENVS)/serve/bin/python
WORKFLOW := $(SERVE_PY) -m workflow
PYTEST_ARGS ?=
BENCH_MODEL ?= runs/viggo-cpu/model/weights
BENCH_ADAPTER ?= runs/viggo-cpu/train/adapters/viggo-cpu
SOAK_APP ?= direct

.PHONY: setup lock check-locks demo test test-serve test-train test-fast test-gpu lint validate ingest model train \
        evaluate serve stop show bench-batch bench-serve bench-soak bench-adapters bench-train bench-demo

setup:            ## build the train and serve environments from envs/*.lock
	WORKFLOW_VENVS=$(VENVS) bash envs/setup.sh

lock:             ## regenerate envs/*.lock from the environments
	bash envs/lock.sh

check-locks:      ## check that envs/serve-gpu.lock still resolves on the package index (metadata only, a few seconds)
	bash envs/check-locks.sh

demo: setup       ## the whole pipeline on the CPU, offline, then a summary
	$(WORKFLOW) run $(RECIPE)

test: setup       ## the whole suite, both environments, in two streams side by side (tests/run_suite.sh)
	bash tests/run_suite.sh $(SERVE_PY) $(TRAIN_PY) $(PYTEST_ARGS)

test-serve: setup
	$(SERVE_PY) -m pytest -m "not train_env" $(PYTEST_ARGS)

test-train: setup
	$(TRAIN_PY) -m pytest -m train_env $(PYTEST_ARGS)

# The tests that start no engine, cluster or training run (tests/conftest.py marks the others `heavy`), in both
# environments: the loop for edits. `make test` runs them too.
test-fast: setup  ## the suite without its heavy tests, a few minutes
	$(SERVE_PY) -m pytest -m "not train_env and not heavy and not gpu" $(PYTEST_ARGS)
	$(TRAIN_PY) -m pytest -m "train_env and not heavy and not gpu" $(PYTEST_ARGS)

# On a GPU machine that has none of our environments (CONTRIBUTING.md, "Tests"): the carried wheels
# (GPU_CARRY, built by build-carry.sh) go into GPU_SITE; every `gpu` test runs, and one that skips fails.
GPU_PY ?= python3
GPU_CARRY ?= .gpu-carry
GPU_SITE ?= /tmp/site
test-gpu:         ## every CUDA test, on a GPU machine with the carried wheels
	[ -f $(GPU_SITE)/.installed ] || { $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) \
	  $(GPU_CARRY)/whl/*.whl && tar -xJf $(GPU_CARRY)/ray-*-slim.tar.xz -C $(GPU_SITE) && touch $(GPU_SITE)/.installed; }
	PYTHONPATH=$(GPU_SITE) HF_HUB_OFFLINE=1 DISABLE_VERSION_CHECK=1 RAY_USAGE_STATS_ENABLED=0 WORKFLOW_GPU_TESTS=1 \
	  WORKFLOW_TRAIN_PYTHON=$$(command -v $(GPU_PY)) WORKFLOW_SERVE_PYTHON=$$(command -v $(GPU_PY)) \
	  $(GPU_PY) -m pytest -m gpu -p no:cacheprovider -rs $(PYTEST_ARGS)

lint: setup
	$(SERVE_PY) -m ruff check workflow tests bench

# The GPU recipes require WORKFLOW_STORAGE (a bucket); validation reaches no storage, so a stand-in serves when unset.
validate: setup
	WORKFLOW_STORAGE=$${WORKFLOW_STORAGE:-s3://validate-only/workflow} $(WORKFLOW) validate recipes/*.yaml

ingest model train evaluate serve: setup
	$(WORKFLOW) $@ $(RECIPE)

stop: setup
	$(WORKFLOW) stop $(RECIPE)

show: setup
	$(WORKFLOW) show $(RECIPE)

bench-batch: setup ## each bench writes bench/results/<benchmark>/<machine>.json (bench/README.md)
	$(SERVE_PY) bench/batch_throughput.py

bench-serve: setup ## needs a model folder: BENCH_MODEL (default: the CPU demo's tiny model)
	$(SERVE_PY) bench/serve_latency.py --model $(BENCH_MODEL)

bench-soak: setup ## 32 streaming clients for 60 s on the CPU recipe's serve app (SOAK_APP=vllm: plain vLLM): failures, memory, shutdown
	$(SERVE_PY) bench/serve_soak.py --model $(BENCH_MODEL) --app $(SOAK_APP) $(if $(filter-out direct,$(SOAK_APP)),--out /tmp/serve_soak-$(SOAK_APP).json)

bench-adapters: setup ## 1-256 adapters (ranks 8, 64) on the CPU recipe's app and plain vLLM: req/s, TTFT, cold loads, memory
	$(SERVE_PY) bench/serve_adapters.py --model $(BENCH_MODEL) --adapter $(BENCH_ADAPTER)

bench-train: setup ## needs a GPU machine (see bench/README.md)
	$(TRAIN_PY) bench/train_throughput.py

bench-demo: setup ## make demo's pipeline on fresh storage, timed stage by stage, with the adapter's metrics
	$(SERVE_PY) bench/demo.py
