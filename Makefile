# Two commands: `make demo` (the main job) and `make test` (the test suite, what CI runs).
# Each creates .venv with Python 3.12 (.python-version makes pyenv's python3 resolve to it) the first time.
PYTHON ?= python3
# pytest worker processes (pytest-xdist, one test file per worker at a time): 2 on this project's
# 2-core CI host; 0 runs one process, which a host with an attached TPU or GPU needs (one process owns it)
TEST_WORKERS ?= 2
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint aot-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), "pallaskit needs Python >= 3.12; got " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test,engine,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m engine.demo
	$(VENV)/bin/python -m bench.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
