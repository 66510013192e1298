# Two commands set up a fresh machine: `make demo` (the main job on real data) and `make test`.
PY ?= python3
PIP = $(PY) -m pip

.PHONY: install demo test

# torch first, pinned: a bare `torch` requirement would pull the CUDA build (gigabytes) on a CPU machine.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"

demo: install
	COMPRESS_QUIET=$${COMPRESS_QUIET:-0} $(PY) -m compress.cli demo

test: install
	$(PY) -m pytest
