# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXAMPLE ?= examples/call_stereo.flac
EXAMPLE_NAMES ?= agent,customer

.PHONY: demo test install clean-venv

# Reinstall only when pyproject.toml changes (the venv is ~5 GB: torch ships CUDA libraries).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/emostream replay $(EXAMPLE) --channel-names $(EXAMPLE_NAMES) --speed 4

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
