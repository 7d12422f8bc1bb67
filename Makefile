# Two entry points for a fresh machine: `make run` and `make test`.
# Both create .venv once and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test prepare train bench deploy clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build this machine provides
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/metarec run

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

prepare: $(STAMP)
	$(BIN)/metarec prepare

bench: $(STAMP)
	$(BIN)/python benchmarks/meta_train.py

clean-venv:
	rm -rf $(VENV)
