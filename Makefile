# agentlog: `make serve` and `make test` are all a newcomer needs.
# Both create .venv and install what is missing on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What serving needs, and (for tests, lints and code generation) the development tools.
RUNTIME := $(VENV)/.installed-runtime
INSTALLED := $(VENV)/.installed
NODE_INSTALLED := node_modules/.installed
BUF := node_modules/.bin/buf
TS := clients/typescript
# The contract as last released: `buf breaking` compares the proto with it.
BASELINE := protos/released/agentlog-v1.binpb
PROTO := agentlog/v1/session.proto
# Unset, `agentlog serve` takes AGENTLOG_ADDR / AGENTLOG_DATA_DIR from the
# environment, else its defaults (127.0.0.1:50051, ./data).
ADDR ?=
DATA_DIR ?=
# The web console and the HTTP (Connect, gRPC-Web) endpoint, on for a newcomer.
HTTP_ADDR ?= $(or $(AGENTLOG_HTTP_ADDR),127.0.0.1:8080)

.PHONY: serve test install proto proto-check console console-check lint typecheck buf-lint buf-breaking pytest ts-test release-contract bench bench-peers clean

serve: $(RUNTIME)
	$(BIN)/agentlog serve $(if $(ADDR),--addr $(ADDR)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
		--http-addr $(HTTP_ADDR)

test: $(INSTALLED) $(NODE_INSTALLED) lint typecheck buf-lint buf-breaking proto-check console-check pytest ts-test

install: $(INSTALLED)

$(RUNTIME): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "agentlog needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(INSTALLED): $(RUNTIME) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# buf, and the TypeScript client's packages (an npm workspace), from the npm registry.
$(NODE_INSTALLED): package.json package-lock.json $(TS)/package.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@
$(BUF): $(NODE_INSTALLED)

# Regenerate the committed stubs (protobuf, type stubs, gRPC), the Python
# event types and the codec's straight-line conversions from the proto.
# OUT lets proto-check generate elsewhere.
OUT ?= src/agentlog
proto: $(INSTALLED) $(NODE_INSTALLED)
	rm -rf build/proto && mkdir -p build/proto $(OUT)/v1
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=build/proto \
		--pyi_out=build/proto --grpc_python_out=build/proto \
		--plugin=protoc-gen-connectrpc=$(BIN)/protoc-gen-connectrpc \
		--connectrpc_out=protobuf=google:build/proto protos/$(PROTO)
	cp build/proto/agentlog/v1/session_pb2.py build/proto/agentlog/v1/session_pb2.pyi \
		build/proto/agentlog/v1/session_pb2_grpc.py build/proto/agentlog/v1/session_connect.py \
		$(OUT)/v1/
	touch $(OUT)/v1/__init__.py
	$(BIN)/python tools/generate_types.py protos $(PROTO) $(OUT)/_events.py
	$(BIN)/python tools/generate_converters.py $(OUT)/_converters.py
	$(BIN)/ruff format --quiet --no-respect-gitignore $(OUT)/_events.py $(OUT)/_converters.py
	cd $(TS) && ../../$(BUF) generate --template buf.gen.yaml $(if $(TS_OUT),--output $(TS_OUT))

# Fails when the committed generated code differs from what the proto gives.
proto-check: $(INSTALLED) $(NODE_INSTALLED)
	rm -rf build/proto-check build/ts-proto-check && mkdir -p build/proto-check
	$(MAKE) --no-print-directory proto OUT=build/proto-check TS_OUT=../../build/ts-proto-check
	for f in v1/__init__.py v1/session_pb2.py v1/session_pb2.pyi v1/session_pb2_grpc.py v1/session_connect.py _events.py _converters.py; do \
		cmp -s build/proto-check/$$f src/agentlog/$$f || { echo "src/agentlog/$$f is stale: run 'make proto' and commit"; exit 1; }; \
	done
	diff -r build/ts-proto-check/src/gen $(TS)/src/gen >/dev/null || { echo "$(TS)/src/gen is stale: run 'make proto' and commit"; exit 1; }
	@echo "generated code is up to date"

# The web console: TypeScript in clients/console, bundled by esbuild into the files
# `agentlog serve --http-addr` serves (committed, so serving needs no Node).
CONSOLE := clients/console
CONSOLE_OUT ?= src/agentlog/server/console
console: $(NODE_INSTALLED)
	mkdir -p $(CONSOLE_OUT)
	node_modules/.bin/esbuild $(CONSOLE)/src/main.ts --bundle --format=esm --minify \
		--target=es2022 --legal-comments=eof --log-level=warning --outfile=$(CONSOLE_OUT)/console.js
	cp $(CONSOLE)/static/index.html $(CONSOLE)/static/console.css $(CONSOLE_OUT)/

# Fails when the committed console differs from what its sources build.
console-check: $(NODE_INSTALLED)
	cd $(CONSOLE) && ../../node_modules/.bin/tsc -p . --noEmit
	node_modules/.bin/prettier --check --log-level warn $(CONSOLE)/src $(CONSOLE)/static
	rm -rf build/console-check
	$(MAKE) --no-print-directory console CONSOLE_OUT=build/console-check
	diff -r build/console-check $(CONSOLE_OUT) >/dev/null || { echo "$(CONSOLE_OUT) is stale: run 'make console' and commit"; exit 1; }
	@echo "the console is up to date"

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(INSTALLED)
	$(BIN)/mypy -p agentlog -p tests -p bench

buf-lint: $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code

# Fails on a change that would break code generated from the released contract
# (see "Compatibility" in the README).
buf-breaking: $(BUF)
	$(BUF) breaking --against $(BASELINE)

# At a release: record the contract as released (commit the file).
release-contract: $(BUF)
	$(BUF) build -o $(BASELINE)

# The TypeScript client's tests, against real servers (Node's test runner).
ts-test: $(INSTALLED) $(NODE_INSTALLED)
	$(WITH_POSTGRES) bash $(TS)/test/run.sh

# The PostgreSQL tests use the server AGENTLOG_TEST_POSTGRES names, else the machine's
# at 127.0.0.1:5432, else one tools/with_postgres.py starts (and removes) for the run.
WITH_POSTGRES := $(BIN)/python tools/with_postgres.py --
pytest: $(INSTALLED)
	$(WITH_POSTGRES) $(BIN)/python -m pytest

# The PostgreSQL store is measured on this server too (BENCH_STORE= to leave it out).
BENCH_STORE ?= postgresql://postgres@127.0.0.1:5432/postgres
bench: $(INSTALLED) $(NODE_INSTALLED)
	cd $(TS) && ../../node_modules/.bin/tsc -p .
	$(BIN)/python -m bench $(if $(BENCH_STORE),--store $(BENCH_STORE)) $(BENCH_ARGS)

# agentlog beside the session stores agent frameworks embed (OpenAI Agents SDK's
# SQLiteSession, LangGraph's SQLite checkpointer), in an environment of their own.
PEERS := .venv-peers
PEER_PACKAGES := openai-agents==0.24.0 langgraph==1.2.22 langgraph-checkpoint-sqlite==3.1.2
bench-peers:
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet -e . $(PEER_PACKAGES)
	$(PEERS)/bin/python -m bench.peers

clean:
	rm -rf build .mypy_cache .pytest_cache .ruff_cache
