# Entry points, each installs what it needs first:
#   make demo      - example training run on CPU that logs gns/ scalars to TensorBoard
#   make test      - the whole test suite (plus ruff and mypy): what CI runs
#   make test-fast - ruff and the tests not marked slow (pyproject.toml says what slow means): about a minute
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test test-fast lint bench clean

# One environment for both entry points: the tests also run the example, so it gets the "examples" extra
# (scikit-learn) as well as "dev". Editable installs of a pyproject-only package need pip >= 21.3 (Python 3.10.0
# ships 21.2); the first pip line does nothing when pip is newer.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "pip>=21.3"
	$(PIP) install -q -c constraints.txt -e ".[dev,examples,cli,report]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) example_projects/digits_classifier.py

lint: install
	$(VENV)/bin/ruff check lightning_gns tests benchmarks example_projects
	$(VENV)/bin/ruff format --check lightning_gns tests benchmarks example_projects
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest -q

test-fast: install
	$(VENV)/bin/ruff check lightning_gns tests benchmarks example_projects
	$(VENV)/bin/ruff format --check lightning_gns tests benchmarks example_projects
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) lightning_logs runs
