# Two commands on a fresh machine: `make demo` and `make test`. Both (re)create the virtual
# environment when pyproject.toml changes. torch comes from `pip install torch==2.13.0`, a CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) bench/demo.py

test: setup
	$(PY) -m lowbit pull smollm2-135m
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/rtn_table.py

clean:
	rm -rf $(VENV) out
