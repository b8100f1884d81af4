#!/usr/bin/env bash
# Runs the HAProxy+Lua reference in the foreground with the defaults below;
# any of them can be overridden from the environment. Extra arguments go to haproxy.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export REF_LUA_DIR="${REF_LUA_DIR:-$(cd "$here/../lua_reference" && pwd)}"
export HAPROXY_BIND="${HAPROXY_BIND:-0.0.0.0}"
export HAPROXY_STATS_BIND="${HAPROXY_STATS_BIND:-127.0.0.1}"
export HAPROXY_CALIBRATION_PORT="${HAPROXY_CALIBRATION_PORT:-10070}"
export HAPROXY_NAIVE_PORT="${HAPROXY_NAIVE_PORT:-10071}"
export HAPROXY_POOLED_PORT="${HAPROXY_POOLED_PORT:-10072}"
export HAPROXY_RAW_PORT="${HAPROXY_RAW_PORT:-10073}"
export HAPROXY_SEED_POOLED_PORT="${HAPROXY_SEED_POOLED_PORT:-10074}"
export HAPROXY_SEED_RAW_PORT="${HAPROXY_SEED_RAW_PORT:-10075}"
export HAPROXY_RAW_LIMITED_PORT="${HAPROXY_RAW_LIMITED_PORT:-10076}"
export HAPROXY_STATS_PORT="${HAPROXY_STATS_PORT:-10079}"
# raw-limited: requests per HAPROXY_LIMIT_PERIOD allowed per client, per HAProxy process.
export HAPROXY_LIMIT_RATE="${HAPROXY_LIMIT_RATE:-100}"
export HAPROXY_LIMIT_PERIOD="${HAPROXY_LIMIT_PERIOD:-1s}"
export HAPROXY_NBTHREAD="${HAPROXY_NBTHREAD:-1}"
export REF_REDIS_HOST="${REF_REDIS_HOST:-127.0.0.1}"
export REF_REDIS_PORT="${REF_REDIS_PORT:-6379}"
export REF_REDIS_DB="${REF_REDIS_DB:-0}"
export REF_POOL_SIZE="${REF_POOL_SIZE:-20}"
export REF_POOL_WAIT_MS="${REF_POOL_WAIT_MS:-1000}"
# 0: no timeout set on the Redis sockets, HAProxy's own apply (see lua_reference/redis_pool.lua).
export REF_TIMEOUT_MS="${REF_TIMEOUT_MS:-0}"
export REF_KEY_PREFIX="${REF_KEY_PREFIX-ip:}"
export REF_TRUSTED_PROXIES="${REF_TRUSTED_PROXIES:-}"
exec haproxy -db -f "$here/haproxy.cfg" "$@"
