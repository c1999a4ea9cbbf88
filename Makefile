# Two commands for a newcomer:  `make serve`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test lint soak bench protos

$(BIN)/riskd: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/riskd

install: $(BIN)/riskd

# Install, then start the daemon on its embedded defaults (127.0.0.1:50051, rules/, ./var).
serve: install
	$(BIN)/riskd serve

# buf (the protobuf linter) comes from the npm registry's @bufbuild/buf package.
BUF := .tools/buf/node_modules/.bin/buf
$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools/buf @bufbuild/buf

lint: install $(BUF)
	$(BUF) lint protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/riskd rules check rules
	$(BIN)/riskd rules test rules

# Install, make sure Redis and PostgreSQL are up, lint, then run the test suite.
test: install
	bash scripts/services.sh
	$(MAKE) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The full-size crash test of the ledger (issue 4, invariant 7): 16 clients, 10,000 requests.
soak: install
	RISKD_LEDGER_CRASH_REQUESTS=10000 $(BIN)/python -m pytest -q -p no:cacheprovider tests/ledger/test_crash.py

bench: install
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m pytest benchmarks -q --benchmark-only

protos: install
	$(BIN)/python tools/genproto.py
