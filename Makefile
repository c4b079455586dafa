# Two commands on a fresh machine: `make run` (service on SQLite) and `make test` (whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/apikeys/v1/*.proto)

.PHONY: install run console screenshots test unit lint typecheck proto check-proto check admin-key bench \
	bench-processes bench-rss bench-smoke bench-propagation bench-faults bench-tripwire bench-overload \
	clean buf contract buf-lint buf-breaking contract-baseline

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/apikeys-server serve

# The admin web console on http://127.0.0.1:8080, for the service `make run` serves.
console: $(STAMP)
	$(BIN)/apikeys-server console

# docs/console/*.png: the console's main pages in headless chromium (apt: chromium
# chromium-driver), over a throw-away server and database.
screenshots: $(STAMP)
	$(BIN)/python -m tests.e2e.console_screenshots

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

# The proto contract, for every language: buf (pinned, from npm into .tools/) lints the protos
# (STANDARD, exceptions in buf.yaml), checks their formatting, and fails on a breaking change
# (FILE category) against protos/baseline.binpb, the contract as last released: an image
# committed with the protos, so the check needs no git history or network beyond npm. After a
# release, `make contract-baseline` and commit it; a deliberate break belongs in apikeys.v2.
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
BUF_STAMP := $(TOOLS)/.buf-$(BUF_VERSION)
BASELINE := protos/baseline.binpb

$(BUF_STAMP):
	npm install --no-save --no-audit --no-fund --loglevel=error --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)
	test "$$($(BUF) --version)" = "$(BUF_VERSION)"
	touch $@

buf: $(BUF_STAMP)

buf-lint: $(BUF_STAMP)
	$(BUF) lint
	$(BUF) format --diff --exit-code

buf-breaking: $(BUF_STAMP)
	$(BUF) breaking --against $(BASELINE)

contract: buf-lint buf-breaking

contract-baseline: $(BUF_STAMP)
	$(BUF) build --exclude-source-info -o $(BASELINE)

# Everything CI checks, in CI's order.
check: lint typecheck check-proto contract test

bench: $(STAMP)
	$(BIN)/python -m bench

# Verify cache hits on `serve --processes 1` vs `--processes 2` (about a minute).
bench-processes: $(STAMP)
	$(BIN)/python -m bench --processes-compare

# Cross-replica propagation: 3 serve processes, PostgreSQL, 900 change trials + 100 listener kills.
bench-propagation: $(STAMP)
	$(BIN)/python -m bench propagation

# One serve process behind a TCP proxy: stopped, blackholed, past the staleness bound, recovered.
bench-faults: $(STAMP)
	$(BIN)/python -m bench faults

# Cache-hit Verify of valid keys vs. a flood of one revoked key, on one server (under a minute).
bench-tripwire: $(STAMP)
	$(BIN)/python -m bench tripwire

# ~1 min: gRPC's own pool vs the dispatcher: cost, overload (2x), 1 000 unfinished calls.
bench-overload: $(STAMP)
	$(BIN)/python -m bench overload

# Only the memory figure: RSS with 100 000 keys in the Verify cache (about 30 s).
bench-rss: $(STAMP)
	$(BIN)/python -m bench --rss-only

bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) $(TOOLS) apikeys.db .pytest_cache .mypy_cache .ruff_cache
