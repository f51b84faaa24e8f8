# The two jobs the README names: `make demo` (the main job) and `make test` (the test suite).
# Both install what they need on a fresh Debian machine with Python >= 3.11; run as root or with sudo
# for the apt step (chromium for the browser test, OpenBLAS for fast float32 matmuls on Linux).

PYTHON ?= python3
PIP = $(PYTHON) -m pip
APT_PACKAGES = chromium libopenblas0-pthread

.PHONY: install install-test demo test

install:
	$(PIP) install -q -e .

install-test:
	@if command -v apt-get >/dev/null && [ "$$(uname)" = Linux ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; fi
	# torch 2.13.0's CPU wheel: named exactly so pip never pulls a multi-GB CUDA build
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,train,lab]"

demo: install
	mtpnb generate --depth 3 --max-tokens 96 "def fibonacci(n):"
	mtpnb bench --quick

test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider tests
