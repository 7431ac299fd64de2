# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXAMPLE ?= examples/call_stereo.flac
EXAMPLE_NAMES ?= agent,customer

.PHONY: demo test install install-test browser clean-venv

# torch, torchaudio and torchvision of one release, the set tested here (.ci/constraints.txt says why)
CONSTRAINTS := $(wildcard .ci/constraints.txt)
ifneq ($(CONSTRAINTS),)
export PIP_CONSTRAINT := $(abspath $(CONSTRAINTS))
endif

# Two stamps, so the venv is reused while pyproject.toml is unchanged: `make demo` installs the core
# package only (torch with its CUDA libraries is most of its size: see the README); `make test` adds the
# [test] extra (Ray, faster-whisper, Selenium, ...). A venv that has the test extra satisfies the demo.
CORE_STAMP := $(VENV)/.installed-core
TEST_STAMP := $(VENV)/.installed

$(CORE_STAMP): pyproject.toml
	@if [ -f $(TEST_STAMP) ] && [ $(TEST_STAMP) -nt pyproject.toml ]; then \
	  touch $@ && touch $(TEST_STAMP); \
	else \
	  set -e; \
	  test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -m pip install --quiet --upgrade pip; \
	  $(BIN)/python -m pip install --quiet -e .; \
	  touch $@; \
	fi

$(TEST_STAMP): $(CORE_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(CORE_STAMP)

install-test: $(TEST_STAMP)

demo: $(CORE_STAMP)
	$(BIN)/emostream replay $(EXAMPLE) --channel-names $(EXAMPLE_NAMES) --speed 4

test: $(TEST_STAMP) browser
	$(BIN)/python -m ruff format --check emostream train tests bench
	$(BIN)/python -m ruff check emostream train tests bench
	$(BIN)/python -m pytest -q

# tests/test_web.py drives the supervisor page in Debian's chromium through chromium-driver. As root
# with apt-get, install both when one is missing; if that fails, or as another user, the test skips
# and says why. Prints nothing when both are there.
BROWSER_LOG := /tmp/emostream-browser-install.log
browser:
	@if { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium chromium-driver >$(BROWSER_LOG) 2>&1 \
	  || { apt-get update -q && apt-get install -y -q chromium chromium-driver; } >>$(BROWSER_LOG) 2>&1 \
	  || echo "make: could not install chromium and chromium-driver (see $(BROWSER_LOG)); the browser test will skip"; \
	fi

clean-venv:
	rm -rf $(VENV)
