# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
# The interpreter the venv is made from: the system's /usr/bin/python3 when it is 3.11 or newer
# (Debian's build, a statically linked interpreter, as the Dockerfile's python:3.11-slim is an
# optimized build), else the first python3 on PATH. A build on a shared libpython without
# profile-guided optimization (pyenv's default) runs the gateway's request path about 1.1x slower
# (docs/benchmarks-method.md#the-interpreter). PYTHON=... picks another; the venv follows it.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
            && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
REDIS_URL ?= redis://127.0.0.1:6379/0
RUN_DIR := run
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

FORCE:

.PHONY: FORCE run test lint system-deps venv native redis haproxy bench bench-quick bench-scaling bench-limits redis-cost instructions chaos clean

# Rebuilt when pyproject.toml changes or when PYTHON names another interpreter than the venv's.
$(VENV)/.installed: pyproject.toml $(if $(filter-out $(shell $(PYTHON) -c 'import os, sys; print(os.path.realpath(sys.executable))' 2>/dev/null),$(shell [ -x $(PY) ] && $(PY) -c 'import os, sys; print(os.path.realpath(sys._base_executable))' 2>/dev/null)),FORCE)
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || [ "$(PYTHON)" != /usr/bin/python3 ] || { \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The request path compiled with mypyc (gateway/native.py) into gateway/_native/; rebuilt whenever
# a source of the package changes, or one is added or removed (until then the package runs
# interpreted: a build that does not match its sources is never used). Without a C compiler and
# Python's headers the build fails with a warning and the gateway runs interpreted: the same code,
# slower (docs/benchmarks-method.md); with GATEWAY_NATIVE_REQUIRED set (CI) the failure stops make.
NATIVE_SOURCES := $(shell find gateway -name '*.py' -not -path 'gateway/_native/*' 2>/dev/null) \
                  $(shell find gateway -type d -not -path 'gateway/_native*' -not -name __pycache__ 2>/dev/null)
gateway/_native/build.json: $(VENV)/.installed $(NATIVE_SOURCES)
	@command -v gcc >/dev/null && [ -e "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || \
	  [ "$(PYTHON)" != /usr/bin/python3 ] || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq gcc python3-dev; } || true
	@$(PY) -m gateway.compile || [ -z "$$GATEWAY_NATIVE_REQUIRED" ]

native: gateway/_native/build.json

# Debian packages the gateway, the reference and the tests use; installed only if missing.
system-deps:
	@missing=""; \
	for bin in redis-server:redis-server haproxy:haproxy wrk:wrk lua5.3:lua5.3 docker-compose:docker-compose; do \
	  command -v $${bin%%:*} >/dev/null || missing="$$missing $${bin##*:}"; \
	done; \
	[ -e /usr/share/lua/5.3/redis.lua ] || [ -e /usr/share/lua/5.1/redis.lua ] || missing="$$missing lua-redis"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Starts a local redis-server if nothing answers at REDIS_URL (local addresses only);
# installs only redis-server if it is missing (the test packages are `make test`'s business).
redis: venv
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server; }
	@if redis-cli -u '$(REDIS_URL)' ping >/dev/null 2>&1; then \
	  echo "redis: answering at $(REDIS_URL)"; \
	else \
	  read host port < <($(PY) -c 'import sys; from gateway.config import parse_redis_url as p; t = p(sys.argv[1]); print(t.host, t.port)' '$(REDIS_URL)'); \
	  case "$$host" in 127.*|localhost|::1) ;; *) echo "redis: nothing answers at $(REDIS_URL), and it is not local: not starting one" >&2; exit 1;; esac; \
	  mkdir -p $(RUN_DIR); \
	  redis-server --bind "$$host" --port "$$port" --daemonize yes --dir "$(CURDIR)/$(RUN_DIR)" \
	    --pidfile "$(CURDIR)/$(RUN_DIR)/redis.pid" --logfile "$(CURDIR)/$(RUN_DIR)/redis.log" --save '' --appendonly no; \
	  for i in $$(seq 50); do redis-cli -h "$$host" -p "$$port" ping >/dev/null 2>&1 && break; sleep 0.1; done; \
	  echo "redis: started on $$host:$$port (log in $(RUN_DIR)/redis.log)"; \
	fi

run: redis native
	REDIS_URL='$(REDIS_URL)' $(VENV)/bin/gateway

# The HAProxy+Lua reference in the foreground, against the same local Redis (ports in haproxy/run.sh).
haproxy: redis system-deps
	read host port < <($(PY) -c 'import sys; from gateway.config import parse_redis_url as p; t = p(sys.argv[1]); print(t.host, t.port)' '$(REDIS_URL)'); \
	REF_REDIS_HOST="$$host" REF_REDIS_PORT="$$port" haproxy/run.sh

test: system-deps venv lint native
	$(PY) -m pytest -q

# The full benchmark (about 24 minutes on 2 cores): every gateway mode and every HAProxy+Lua mode, redirecting
# and proxying (the proxy targets forward to haproxy/upstream.cfg), 5 rounds.
bench: system-deps venv native
	$(PY) -m loadtest --rounds 5 --out results/bench --report docs/benchmarks.md $(BENCH_ARGS)

# A smoke run of a few seconds per target: checks the whole pipeline, not for quoting.
bench-quick: system-deps venv native
	$(PY) -m loadtest --duration 1 --warmup 1 --rounds 1 --out results/quick $(BENCH_ARGS)

# One and two workers per mode, with HAProxy's calibration as the injector's ceiling (docs/scaling.md).
bench-scaling: system-deps venv native
	$(PY) -m loadtest --targets gateway/off,gateway/off-w2,gateway/raw,gateway/raw-w2,gateway/batched,gateway/batched-w2,haproxy/calibration --rounds 3 --duration 10 --out results/scaling $(BENCH_ARGS)

# Each Redis mode with --limit beside the same mode without, and HAProxy's stick-table limit
# beside its raw listener (docs/limits.md). BENCH_ARGS='--duration 1 --warmup 1 --rounds 1' for a smoke run.
LIMIT_TARGETS := gateway/naive,gateway/naive-limit,gateway/pooled,gateway/pooled-limit,gateway/raw,gateway/raw-limit,gateway/multiplexed,gateway/multiplexed-limit,gateway/batched,gateway/batched-limit,haproxy/raw,haproxy/raw-limited
bench-limits: system-deps venv native
	$(PY) -m loadtest --targets $(LIMIT_TARGETS) --rounds 3 --out results/limits $(BENCH_ARGS)

# Redis CPU per request in each mode, and redis-benchmark's INCR ceiling (the 16-core estimate).
redis-cost: system-deps venv native
	$(PY) -m loadtest.rediscost

# User-space instructions per request of each gateway mode under valgrind's callgrind (about a
# minute per mode): the cost without this machine's run-to-run noise (python -m loadtest.instructions).
instructions: system-deps venv native
	@command -v valgrind >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq valgrind; }
	$(PY) -m loadtest.instructions $(INSTRUCTIONS_ARGS)

# Fault scenarios (Redis paused, killed, restarted, erroring; slowloris; SIGTERM) as a table (about 2 minutes).
chaos: system-deps venv native
	$(PY) -m loadtest.chaos --out results/chaos.md

lint: venv
	$(VENV)/bin/ruff check gateway tests $(wildcard loadtest)
	$(VENV)/bin/ruff format --check gateway tests $(wildcard loadtest)
	$(VENV)/bin/mypy   # gateway/ and loadtest/, configured in pyproject.toml

clean:
	rm -rf $(VENV) $(RUN_DIR) .pytest_cache .ruff_cache *.egg-info build/native gateway/_native
