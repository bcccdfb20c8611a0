# Two entry points for a new user: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint types unit bench clean bytecode

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# An editable install leaves sfembed's own bytecode to the first import, and a process that may not
# write it (PYTHONDONTWRITEBYTECODE) compiles every module again at each start: some 0.1 s before
# the first request. Compiled here, as an installed package's is (a no-op when up to date).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q sfembed

# The bundled sample (2,000 English and Chinese documents, some over bge-m3's 8,192-token limit)
# against the built-in local server, with a 6 s window so the pacing shows in seconds.
demo: bytecode
	mkdir -p out
	$(BIN)/sfembed embed --local sfembed/data/sample.jsonl --out out/demo.npy \
		--model BAAI/bge-m3 --rpm 600 --tpm 300000 --window-s 6 --no-cache

lint: $(STAMP)
	$(BIN)/ruff check sfembed tests benchmarks
	$(BIN)/ruff format --check sfembed tests benchmarks

# The tests and benchmarks too: they use the library as its users do, and keep it honest.
types: $(STAMP)
	$(BIN)/mypy sfembed tests benchmarks

unit: bytecode
	$(BIN)/pytest -q

test: lint types unit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
