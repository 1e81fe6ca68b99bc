# On this machine torch 2.13.0 (CPU build) installs from local disk; an unpinned torch would
# pull a multi-GB CUDA build, so it is pinned here while the package itself keeps a range.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: venv run test bench clean

$(BIN)/zaya: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/zaya

run: venv
	$(BIN)/zaya generate "What is 12 + 30?" --max-new-tokens 64
	$(BIN)/zaya solve "What is 12 + 30?" --profile cpu-tiny

test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/compare_transformers.py --shape mini

clean:
	rm -rf $(VENV) build *.egg-info
