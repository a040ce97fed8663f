# Set-up and the two everyday jobs. `make repro` and `make test` install everything they need on first use.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
LLAMA_CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: install repro test test-fast

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build (this is the version the constraints were resolved with); a GPU machine may install its own torch first.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# llama-cpp-python compiles llama.cpp: the library only, on both cores.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	# PyLate for the colbert family, without its pins (pyproject.toml says why).
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt pylate==1.6.0
	touch $@

install: $(BIN)/.installed

# The main job: the whole stage graph on params.yaml's defaults.
repro: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

# All tests, including the `dvc repro` integration test.
test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

test-fast: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m "not integration"
