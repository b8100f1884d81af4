"""The Redis side of the limits: one Lua script per algorithm, run by EVALSHA.

Each decision script is one round trip that does everything a limited request
needs in Redis, atomically:

- `INCRBY KEYS[1] 1` on the client's total counter, exactly the command every
  mode sends without a limit (an error there, WRONGTYPE say, is the reply);
- reads Redis' clock (`TIME`), so every gateway process and host shares one
  clock and none has to be in sync with another;
- updates the client's limit state in KEYS[2] if the request is allowed (only
  allowed requests use quota) and gives it a TTL, so idle clients cost nothing;
- returns `{total, allowed (1|0), remaining, reset_us, retry_after_us}`.

ARGV is `limit, period_us, burst`. The flush scripts do the batched mode's
side: apply the increments and the already-decided allowed counts of many
clients in one step, idempotently (the sequence number of `gateway.backends.
batched`), and return each client's limit state so the gateways can decide
locally until the next flush.

The arithmetic is `gateway.limit.algorithms` transcribed, in microseconds.
`redis.replicate_commands()` (a no-op from Redis 5 on) lets a script that read
`TIME` write on Redis 3.2 and 4. The two keys of one client share a hash slot
(`limit_key`), so the scripts run on Redis Cluster too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Lets scripts write after TIME on Redis 3.2 and 4 (effects replication); from 5 on the default.
_PRELUDE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit, period, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
"""

# Per algorithm: `load(key)` -> state, `add(state, n)` -> state, `store(key, state)`,
# `decide(state)` -> allowed, remaining, reset, retry_after, new state; `dump(state)` -> array.
_FIXED = """
local function load(key)
  local s = redis.call('HMGET', key, 'w', 'c')
  local w = math.floor(now / period)
  if tonumber(s[1]) == w then return {w, tonumber(s[2])} end
  return {w, 0}
end
local function add(s, n) return {s[1], s[2] + n} end
local function store(key, s)
  redis.call('HSET', key, 'w', s[1], 'c', s[2])
  redis.call('PEXPIRE', key, math.ceil(((s[1] + 1) * period - now) / 1000) + 1)
end
local function decide(s)
  local reset = (s[1] + 1) * period - now
  if s[2] < limit then return 1, limit - s[2] - 1, reset, 0, add(s, 1) end
  return 0, 0, reset, reset, s
end
local function dump(s) return s end
"""

_SLIDING = """
local function load(key)
  local s = redis.call('HMGET', key, 'w', 'c', 'p')
  local w = math.floor(now / period)
  local w0 = tonumber(s[1])
  if w0 == w then return {w, tonumber(s[2]), tonumber(s[3]) or 0} end
  if w0 == w - 1 then return {w, 0, tonumber(s[2])} end
  return {w, 0, 0}
end
local function add(s, n) return {s[1], s[2] + n, s[3]} end
local function store(key, s)
  redis.call('HSET', key, 'w', s[1], 'c', s[2], 'p', s[3])
  redis.call('PEXPIRE', key, math.ceil(((s[1] + 2) * period - now) / 1000) + 1)
end
local function decide(s)
  local count, prev = s[2], s[3]
  local elapsed = now - s[1] * period
  local estimate = prev * (1 - elapsed / period) + count
  local reset = period - elapsed
  if estimate + 1 <= limit + 1e-9 then
    return 1, math.max(0, math.floor(limit - estimate - 1 + 1e-9)), reset, 0, add(s, 1)
  end
  local wait
  if count + 1 <= limit and prev > 0 then
    wait = period * (1 - (limit - 1 - count) / prev) - elapsed
  elseif count > 0 then
    wait = reset + math.max(0, period * (1 - (limit - 1) / count))
  else
    wait = reset
  end
  return 0, 0, reset, math.max(wait, 0), s
end
local function dump(s) return s end
"""

_GCRA = """
local interval = period / limit
local capacity = burst * interval
local function load(key) return {tonumber(redis.call('GET', key) or '0')} end
local function add(s, n) return {math.max(s[1], now) + n * interval} end
local function store(key, s)
  redis.call('SET', key, string.format('%.3f', s[1]), 'PX', math.ceil((s[1] - now) / 1000) + 1)
end
local function decide(s)
  local tat = math.max(s[1], now)
  local new_tat = tat + interval
  local allow_at = new_tat - capacity
  if now + 0.001 < allow_at then return 0, 0, tat - now, allow_at - now, s end
  local remaining = math.max(0, math.floor((capacity - (new_tat - now)) / interval + 1e-9))
  return 1, remaining, new_tat - now, 0, {new_tat}
end
-- Microseconds as an integer: Lua numbers become integers in a script's reply.
local function dump(s) return {math.floor(s[1])} end
"""

_DECIDE = """
local total = redis.pcall('INCRBY', KEYS[1], 1)
if type(total) == 'table' and total.err then return total end
local allowed, remaining, reset, retry, s = decide(load(KEYS[2]))
if allowed == 1 then store(KEYS[2], s) end
return {total, allowed, remaining, math.ceil(reset), math.ceil(retry)}
"""

# KEYS[1]: the process' sequence marker; then (total key, limit key) per client.
# ARGV: limit, period_us, burst, seq, marker TTL, then (increments, allowed) per client.
# Returns {applied, now_us, {index, error, ...}, {state, state, ...}} (index from 1).
_FLUSH = """
local seq = tonumber(ARGV[4])
local applied = seq > tonumber(redis.call('GET', KEYS[1]) or '0')
local errors, states = {}, {}
for i = 1, (#KEYS - 1) / 2 do
  local tkey, lkey = KEYS[2 * i], KEYS[2 * i + 1]
  local s = load(lkey)
  if applied then
    local r = redis.pcall('INCRBY', tkey, ARGV[4 + 2 * i])
    if type(r) == 'table' and r.err then
      errors[#errors + 1] = i
      errors[#errors + 1] = r.err
    end
    local n = tonumber(ARGV[5 + 2 * i])
    if n > 0 then
      s = add(s, n)
      store(lkey, s)
    end
  end
  states[i] = dump(s)
end
if applied then redis.call('SET', KEYS[1], seq, 'EX', ARGV[5]) end
return {applied and 1 or 0, now, errors, states}
"""

_BODIES = {"fixed": _FIXED, "sliding": _SLIDING, "gcra": _GCRA}


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1, the name EVALSHA runs it by."""

    body: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.body.encode()).hexdigest()


def decide_script(algorithm: str) -> Script:
    """INCRBY the total, decide one request, update the limit state: one round trip."""
    return Script(_PRELUDE + _BODIES[algorithm] + _DECIDE)


def flush_script(algorithm: str) -> Script:
    """The batched flush with limits: increments and allowed counts of many clients."""
    return Script(_PRELUDE + _BODIES[algorithm] + _FLUSH)


def limit_key(total_key: str, algorithm: str) -> str:
    """The key of a client's limit state, in the hash slot of its total counter `total_key`.

    Without braces in the total key, the whole key becomes the hash tag
    (`{ip:10.0.0.1}:limit:gcra`); a key that has a hash tag keeps it first
    (`{ip}:10.0.0.1:limit:gcra`). `check_prefix` refuses prefixes where neither holds.
    The algorithm is in the name because each keeps a different type of value.
    """
    if "{" in total_key:
        return f"{total_key}:limit:{algorithm}"
    return f"{{{total_key}}}:limit:{algorithm}"


def check_prefix(prefix: str) -> str | None:
    """Why a key prefix cannot share a slot with the limit keys, or None when it can."""
    if "{" not in prefix and "}" not in prefix:
        return None
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    if start >= 0 and end > start + 1 and prefix.find("}") > start:
        return None
    return (
        f"key prefix {prefix!r} has braces but no complete hash tag: with --limit the prefix must "
        "have no braces or a complete non-empty {tag}, so a client's keys share a hash slot"
    )
