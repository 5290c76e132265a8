# The two commands of the README: `make demo` and `make test`. Both create .venv when
# it is missing and install requirements.txt into it (re-installed when that changes).
# The recipes behind the README's results tables are scripts/*.sh (see the README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint wheel venv clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m captioner demo

test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check captioner tests scripts
	for f in scripts/*.sh; do bash -n "$$f" || exit 1; done
	if command -v shellcheck >/dev/null 2>&1; then shellcheck -x scripts/*.sh; \
	else echo "shellcheck not installed: scripts/*.sh only syntax-checked"; fi

# The installable package (configs, kernel source and report assets inside) in dist/.
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation --wheel-dir dist .

clean:
	rm -rf runs .pytest_cache .ruff_cache build dist
