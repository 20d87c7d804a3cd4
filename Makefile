# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0 (a plain `torch` requirement would pull a CUDA build of several GB).
TORCH ?= torch==2.13.0

.PHONY: demo test lint install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else f"kdcache needs Python 3.11 or newer (pyproject.toml: requires-python), and $(PYTHON) is {sys.version.split()[0]}: run make PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,sweep,remote,export]'
	touch $@

demo: install
	$(BIN)/kdcache demo

test: install
	$(BIN)/python -m pytest -q

# The linter's settings are in pyproject.toml ([tool.ruff]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data/demo data/demo.lock
