# One command each, on a fresh machine with Python 3.11:
#   make demo   - create .venv, install, answer a prompt about an image
#   make test   - create .venv, install, run the whole suite on every backend
PYTHON ?= python3
VENV ?= .venv
BACKENDS ?= jax tensorflow torch
BIN := $(VENV)/bin

.PHONY: setup demo test

$(VENV)/.installed: requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-test.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m keras_paligemma generate \
		--preset presets/pali_gemma_shapes \
		--image guides/images/shapes_demo.png \
		--prompt "caption en"

test: setup
	@for backend in $(BACKENDS); do \
		echo "=== KERAS_BACKEND=$$backend"; \
		KERAS_BACKEND=$$backend $(BIN)/python -m pytest -q -p no:cacheprovider tests || exit 1; \
	done
