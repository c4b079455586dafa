# Two commands on a fresh machine: `make run` (service on SQLite) and `make test` (whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/apikeys/v1/*.proto)

.PHONY: install run test unit lint typecheck proto check-proto check admin-key bench bench-processes bench-rss bench-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/apikeys-server serve

admin-key: $(STAMP)
	@$(BIN)/apikeys-server admin-key

test: $(STAMP)
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

proto: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=client --grpc_python_out=client \
		--mypy_out=client --mypy_grpc_out=client \
		$(PROTOS)

# Regenerates and fails if the committed generated code differs.
check-proto: proto
	git diff --exit-code -- client/apikeys/v1
	@test -z "$$(git status --porcelain -- client/apikeys/v1)" || (echo "untracked generated files" && exit 1)

# Everything CI checks, in CI's order.
check: lint typecheck check-proto test

bench: $(STAMP)
	$(BIN)/python -m bench

# Verify cache hits on `serve --processes 1` vs `--processes 2` (about a minute).
bench-processes: $(STAMP)
	$(BIN)/python -m bench --processes-compare

# Only the memory figure: RSS with 100 000 keys in the Verify cache (about 30 s).
bench-rss: $(STAMP)
	$(BIN)/python -m bench --rss-only

bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) apikeys.db .pytest_cache .mypy_cache .ruff_cache
