# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean reports

install: $(STAMP)

# the tested set: constraints.txt pins torch 2.13.0 (the CPU wheel here) and everything else
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/scalevec compare --preset demo --jobs 2 --reference results/study-iwd-cpu --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# every study report, regenerated from the run records committed under results/
reports: $(STAMP)
	for dir in results/study-*-cpu; do $(BIN)/scalevec report $$dir > /dev/null && echo "wrote $$dir/report.md"; done

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build src/*.egg-info
