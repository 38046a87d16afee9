# llmproxy: every target installs what it needs first, so a fresh machine needs only `make run`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
GEN := gen
PROTOS := $(wildcard protos/llmproxy/v1/*.proto)
GRPC_ADDR ?= 127.0.0.1:50051
BRIDGE_HOST ?= 127.0.0.1
BRIDGE_PORT ?= 8765
HTTP_PORT ?= 8766
METRICS_ADDR ?= 127.0.0.1:9464
APT_PACKAGES := chromium redis-server tmux
NPM_DIR := clients/js
# The Node gRPC client's packages (@grpc/grpc-js, @grpc/proto-loader) and buf (@bufbuild/buf).
NODE_DIR := clients/node

PYTHON_MIN := 3.11

.PHONY: check-python install install-test lint-proto lock protos run cluster test test-unit test-integration bench typecheck clean

## check-python: Python >= 3.11 (pyproject's requires-python), checked before anything is built,
## so an older python3 is named at once instead of failing late in the stub generation or pip.
## An existing .venv is checked too (one made by an older Python is stale: `make clean`).
check-python:
	@set -u; \
	if [ -x $(PY) ]; then py=$(PY); else py='$(PYTHON)'; fi; \
	v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || v=""; \
	major=$${v%%.*}; minor=$${v#*.}; \
	if ! [[ "$$v" =~ ^[0-9]+\.[0-9]+$$ ]]; then \
	  echo "llmproxy needs Python $(PYTHON_MIN) or newer, and '$$py' did not run as a Python interpreter." >&2; \
	  echo "Install Python $(PYTHON_MIN)+ and pass it: make $(or $(MAKECMDGOALS),install) PYTHON=python$(PYTHON_MIN)" >&2; \
	  exit 1; \
	elif [ "$$major" -lt 3 ] || { [ "$$major" -eq 3 ] && [ "$$minor" -lt $(word 2,$(subst ., ,$(PYTHON_MIN))) ]; }; then \
	  echo "llmproxy needs Python $(PYTHON_MIN) or newer; '$$py' is Python $$v." >&2; \
	  if [ "$$py" = "$(PY)" ]; then \
	    echo "$(VENV) was made by that Python: make clean, then make $(or $(MAKECMDGOALS),install) PYTHON=python$(PYTHON_MIN)" >&2; \
	  else \
	    echo "Install Python $(PYTHON_MIN)+ and pass it: make $(or $(MAKECMDGOALS),install) PYTHON=python$(PYTHON_MIN)" >&2; \
	  fi; \
	  exit 1; \
	fi

## install: virtual environment, Python packages (hash-checked, from requirements/run.lock), stubs.
install: $(VENV)/.stamp-install

$(VENV)/.stamp-venv: | check-python
	$(PYTHON) -m venv $(VENV)
	touch $@

# Every package comes from a lock file with hashes: the runtime and build tools (grpcio-tools,
# setuptools) from run.lock, the test extras on top from test.lock (pinned to the same versions).
# The project itself is then installed without resolving anything (--no-deps) and built with the
# locked setuptools (--no-build-isolation), so nothing unpinned is downloaded.
$(VENV)/.stamp-deps: requirements/run.lock | $(VENV)/.stamp-venv
	$(PIP) install --quiet --require-hashes -r requirements/run.lock
	touch $@

# Stubs are generated from protos/ into gen/ (not committed); `make protos` reproduces them.
protos: $(GEN)/.stamp-protos

$(GEN)/.stamp-protos: $(PROTOS) $(VENV)/.stamp-deps
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(GEN) --pyi_out=$(GEN) \
	    --grpc_python_out=$(GEN) $(PROTOS)
	touch $(GEN)/llmproxy/__init__.py $(GEN)/llmproxy/v1/__init__.py $(GEN)/llmproxy/py.typed
	touch $@

$(VENV)/.stamp-install: pyproject.toml $(VENV)/.stamp-deps $(GEN)/.stamp-protos
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	touch $@

## install-test: test extras (hash-checked, from requirements/test.lock), Debian packages
## (Chromium, Redis) and npm packages.
install-test: $(VENV)/.stamp-test $(NPM_DIR)/node_modules/.stamp $(NODE_DIR)/node_modules/.stamp

# Debian packages not yet installed, with apt-get (sudo unless root): $(call apt_install,pkg ...).
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
endef

$(VENV)/.stamp-test: requirements/test.lock $(VENV)/.stamp-install
	$(PIP) install --quiet --require-hashes -r requirements/test.lock
	$(call apt_install,$(APT_PACKAGES))
	touch $@

## lock: regenerate requirements/run.lock and test.lock from pyproject.toml with pip-tools, keeping
## the pins that still fit; `make lock UPGRADE=1` moves every pin to the newest release. The locks
## are resolved for the Python that runs this (the README says which one they were made with).
LOCK_ARGS = --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-find-links $(if $(UPGRADE),--upgrade)

lock: | $(VENV)/.stamp-venv
	$(PIP) install --quiet "pip-tools>=7.4"
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_ARGS) --extra build \
	    -o requirements/run.lock pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_ARGS) --extra build --extra test \
	    -c requirements/run.lock -o requirements/test.lock pyproject.toml

$(NPM_DIR)/node_modules/.stamp: $(NPM_DIR)/package.json
	cd $(NPM_DIR) && npm install --no-audit --no-fund --loglevel=error
	touch $@

$(NODE_DIR)/node_modules/.stamp: $(NODE_DIR)/package.json
	cd $(NODE_DIR) && npm install --no-audit --no-fund --loglevel=error
	touch $@

## lint-proto: buf lint and buf breaking (also run by `make test`, tests/unit/test_buf.py).
lint-proto: $(NODE_DIR)/node_modules/.stamp
	$(NODE_DIR)/node_modules/.bin/buf lint
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_buf.py

# The secret bridges present on the server's Relay RPC: made once, readable by this user only.
RELAY_TOKEN := .run/relay-token
# Extra page origins the bridge accepts (space-separated), e.g. ALLOWED_ORIGINS=https://app.example.com
ALLOWED_ORIGINS ?=

$(RELAY_TOKEN):
	@mkdir -p $(dir $@) && umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > $@

## run: the server (gRPC on 127.0.0.1:50051) and the bridge (ws://127.0.0.1:8765/stream, and the
## OpenAI/Anthropic-compatible HTTP APIs and SSE on http://127.0.0.1:8766, docs/http-apis.md).
run: install $(RELAY_TOKEN)
	@set -u; \
	$(PY) -m server.main --listen $(GRPC_ADDR) --metrics-listen $(METRICS_ADDR) --relay-token-file $(RELAY_TOKEN) & srv=$$!; \
	$(PY) -m bridge.main --host $(BRIDGE_HOST) --port $(BRIDGE_PORT) --http-port $(HTTP_PORT) --grpc-target $(GRPC_ADDR) --relay-token-file $(RELAY_TOKEN) \
	    $(foreach o,$(ALLOWED_ORIGINS),--allowed-origin $(o)) & brg=$$!; \
	trap 'kill -TERM $$srv $$brg 2>/dev/null; wait $$srv $$brg' INT TERM; \
	echo "llmproxy: gRPC   $(GRPC_ADDR)  (grpcurl -plaintext $(GRPC_ADDR) list)"; \
	echo "llmproxy: stream ws://$(BRIDGE_HOST):$(BRIDGE_PORT)/stream"; \
	echo "llmproxy: chat   http://$(BRIDGE_HOST):$(BRIDGE_PORT)/   dashboard http://$(BRIDGE_HOST):$(BRIDGE_PORT)/dashboard.html"; \
	echo "llmproxy: HTTP APIs http://$(BRIDGE_HOST):$(HTTP_PORT)/v1  (OpenAI, Anthropic base URL: docs/http-apis.md)"; \
	echo "llmproxy: metrics http://$(METRICS_ADDR)/metrics"; \
	echo "llmproxy: Ctrl-C stops both"; \
	wait -n $$srv $$brg; kill -TERM $$srv $$brg 2>/dev/null; wait

## cluster: Redis, then one server and one bridge per core (PROCS=2 to choose) on one machine:
## servers share gRPC $(GRPC_ADDR) and bridges ws://$(BRIDGE_HOST):$(BRIDGE_PORT) and port $(HTTP_PORT)
## (SO_REUSEPORT), every bridge relays to every server, sessions in Redis (docs/deploy.md).
## The launcher is llmproxy_cli/cluster.py (`llmproxy cluster --help`); Ctrl-C stops all.
PROCS ?= $(shell nproc 2>/dev/null || echo 2)
CLUSTER_REDIS_PORT ?= 6399
CLUSTER_RELAY_PORT_BASE ?= 50061

cluster: install $(RELAY_TOKEN)
	$(call apt_install,redis-server)
	$(PY) -m llmproxy_cli.cluster --procs $(PROCS) --host $(BRIDGE_HOST) --grpc-port $(lastword $(subst :, ,$(GRPC_ADDR))) \
	    --relay-port-base $(CLUSTER_RELAY_PORT_BASE) --metrics-port-base $(lastword $(subst :, ,$(METRICS_ADDR))) \
	    --ws-port $(BRIDGE_PORT) --http-port $(HTTP_PORT) --redis-port $(CLUSTER_REDIS_PORT) \
	    --relay-token-file $(RELAY_TOKEN) $(foreach o,$(ALLOWED_ORIGINS),--allowed-origin $(o))

## test: unit and integration tests (the README's test command).
test: install-test
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: install-test
	$(PY) -m pytest -q tests/unit

test-integration: install-test
	$(PY) -m pytest -q tests/integration

typecheck: install-test
	$(PY) -m mypy

## bench: the chain against a direct read, side by side; table on stdout, JSON in bench/results/.
bench: install-test
	$(PY) -m bench.run --out bench/results
	@echo "== the same chain without analytics (metrics, request log, live stats): their cost =="
	$(PY) -m bench.run --only A50,iv,iii_200 --server-arg=--no-analytics --out bench/results/no-analytics
	@echo "== grpc.aio and websockets on their own (memory per idle connection, CPU per message, round trip, burst of starts): the floor =="
	$(PY) -m bench.floor | tee bench/results/floor.txt
	@echo "== the response cache: first token of a live answer, an exact hit and a semantic hit; lookup cost =="
	$(PY) -m bench.cache_hit --rounds 20 | tee bench/results/cache.txt
	@echo "== many processes (issue 14): (iii) and (iv) with 1 server + 1 bridge on Redis, then 2 + 2 (make cluster's layout), unpinned =="
	$(PY) -m bench.run --only iii_50,iii_100,iii_150,iii_200,iii_300,iv --no-pin --redis --out bench/results/procs1
	$(PY) -m bench.run --only iii_50,iii_100,iii_150,iii_200,iii_300,iv --procs 2 --out bench/results/procs2
	@echo "== the store: (iii) 50 streams with the memory store and with Redis, in turn (proxy CPU per token, relay latency, redis-server CPU) =="
	$(PY) -m bench.store --pairs 3 | tee bench/results/store.txt

clean:
	rm -rf $(VENV) $(GEN) $(NPM_DIR)/node_modules $(NODE_DIR)/node_modules .pytest_cache .mypy_cache *.egg-info
