# The two jobs the README names: `make demo` (the main job) and `make test` (the test suite).
#
# Both work in their own virtual environment, .venv/ (made with $(PYTHON), default python3; give another
# with `make demo PYTHON=python3.12`), so they also run where the system Python refuses `pip install`
# (Debian/Ubuntu's "externally-managed-environment"). The venv is self-contained (no
# --system-site-packages): Jupyter finds widget front ends only under the venv's own share/jupyter, so
# JupyterLab and the widget packages taken from the system Python render no widgets. On Linux with apt, the apt
# steps need root or sudo: OpenBLAS for both jobs (MLX's Linux CPU wheel ships the slow reference BLAS;
# `import mtpnb` loads OpenBLAS in its place), a C compiler for both (mtpnb compiles its CPU verify kernels on
# first use; without one MLX's slower ops run), chromium for the browser tests.

PYTHON ?= python3
VENV ?= .venv
VPY = $(VENV)/bin/python
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TEST_APT_PACKAGES = chromium libopenblas0-pthread gcc
# The quick benchmark's duration, measured (`time mtpnb bench --quick`, 2 x86-64 cores, OpenBLAS, nothing else running:
# 30 s, and 35 s inside `make demo` in a fresh clone, 2026-12-04).
QUICK_BENCH_TIME = about 35 s on 2 idle cores, several minutes on busy ones

.PHONY: install install-test venv openblas compiler demo test

# The venv; Debian/Ubuntu keep `venv` in a package of its own (python3-venv), installed when it is missing.
$(VPY):
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null && command -v apt-get >/dev/null; then \
	  echo "Installing python3-venv (apt-get): $(PYTHON) cannot make a virtual environment without it"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null; fi
	$(PYTHON) -m venv $(VENV)

venv: $(VPY)

# OpenBLAS on Linux, from apt when it is missing (Debian/Ubuntu put it under /usr/lib/<arch>/openblas-pthread).
openblas:
	@if [ "$$(uname)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null; then \
	    echo "Installing OpenBLAS (apt-get install libopenblas0-pthread): MLX's Linux wheel ships the reference BLAS, too slow for MTP to pay off"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libopenblas0-pthread >/dev/null; \
	  else echo "No apt-get here: install OpenBLAS with your package manager, or MTP will run on the slow reference BLAS"; fi; fi

# A C compiler, from apt when there is none: mtpnb.cpu_kernels compiles the CPU verify kernels with it.
compiler:
	@if [ "$$(uname)" = Linux ] && ! command -v "$${CC:-cc}" >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    echo "Installing gcc (apt-get): mtpnb compiles its CPU verify kernels on first use"; \
	    $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq gcc >/dev/null; \
	  else echo "No apt-get here: install a C compiler (gcc), or MTP runs on MLX's slower CPU ops"; fi; fi

# JupyterLab's default, for this venv, to save widget state with a notebook (pyproject.toml's data file says
# why): an editable install (pip install -e) leaves a wheel's data files out, so it is put in place here.
LAB_OVERRIDES = share/jupyter/lab/settings/overrides.d/mtpnb.json
$(VENV)/$(LAB_OVERRIDES): jupyter-config/lab/settings/overrides.d/mtpnb.json | $(VPY)
	install -D -m 644 $< $@

install: $(VPY) $(VENV)/$(LAB_OVERRIDES)
	$(VPY) -m pip install -q -e .

install-test: $(VPY) $(VENV)/$(LAB_OVERRIDES)
	@if [ "$$(uname)" = Linux ] && command -v apt-get >/dev/null; then \
	  echo "Installing $(TEST_APT_PACKAGES) (apt-get)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(TEST_APT_PACKAGES) >/dev/null; fi
	# torch 2.13.0's CPU wheel: named exactly so pip never pulls a multi-GB CUDA build
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q -e ".[test,train,lab]"

demo: openblas compiler install
	$(VPY) -m mtpnb info
	$(VPY) -m mtpnb generate --depth 3 --max-tokens 96 "def fibonacci(n):"
	@echo "Next: mtpnb bench --quick, depth 0 against the MTP depths on the same model ($(QUICK_BENCH_TIME))"
	$(VPY) -m mtpnb bench --quick
	@echo "mtpnb is installed in $(VENV)/: run '. $(VENV)/bin/activate' to use it; for the notebooks, pip install -e '.[lab]' (JupyterLab), then mtpnb lab"

test: install-test
	$(VPY) -m pytest -q -p no:cacheprovider tests
