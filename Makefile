# Two commands on a fresh machine: `make demo` and `make test`. Both (re)create the virtual
# environment when pyproject.toml changes. torch comes from `pip install torch==2.13.0`, a CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llama-cpp-python (the llama.cpp the GGUF tests run) compiles from its sdist once (~6 min on 2 cores);
# pip keeps the wheel in ~/.cache/pip/wheels, so a recreated venv installs it in seconds. pip's cache
# key ignores CMAKE_ARGS, hence the portable AVX2 baseline instead of -march=native.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: setup kernels demo test bench llama-tools clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet -e '.[test,llama-cpp]'
	touch $(STAMP)

# lowbit's CPU kernels, compiled once into $$LOWBIT_HOME/kernels/<source hash> (~1 min on 2 cores). A machine
# that cannot build them still runs everything on the reference path; the command says why.
kernels: $(STAMP)
	$(PY) -m lowbit.kernels || echo "lowbit kernels not built: the reference path will be used"

setup: $(STAMP) kernels

demo: setup
	$(PY) bench/demo.py

test: setup
	$(PY) -m lowbit pull smollm2-135m
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/rtn_table.py

llama-tools: setup  # llama-quantize / llama-imatrix for bench/gguf_files.py (~7 min once)
	bash bench/llama_cpp_tools.sh

clean:
	rm -rf $(VENV) out
