# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[test]"
	touch $(STAMP)

# One BLAS thread: ASE's BFGS on small cells is 5x slower with OpenBLAS threads fighting torch's.
test: lint
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q

# Linter and formatter (ruff) on everything, the type checker (mypy) on ase_bptt/.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/ase-bptt demo

clean:
	rm -rf $(VENV) build *.egg-info
