# Two commands: `make test` runs the whole suite, `make run` runs the main job.
# Each creates .venv when missing, installs the CPU torch wheel first (so nothing drags in a CUDA build),
# then the package with the extras it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1

.PHONY: test run lint install-dev install-run

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0

install-dev: $(PY)
	$(PIP) install -e '.[dev]'

install-run: $(PY)
	$(PIP) install -e .

test: install-dev
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The embedded default model (otter/default_model, trained on the synthetic shapes) answers about bundled images.
run: install-run
	$(VENV)/bin/otter generate --image examples/images/red_circle.png --prompt "What colour is the shape?"
	$(VENV)/bin/otter generate --image examples/images/blue_square.png --prompt "What shape is it?"
