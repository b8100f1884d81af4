"""The Redis side of the limits: one Lua script per algorithm, run by EVALSHA.

Each decision script is one round trip that does everything a limited request
needs in Redis, atomically:

- reads Redis' clock (`TIME`), so every gateway process and host shares one
  clock and none has to be in sync with another;
- reads the client's limit state in KEYS[2]; a state that cannot be read (another
  type, a field that is no number) is the reply, before anything is counted;
- `INCRBY KEYS[1] 1` on the client's total counter, exactly the command every
  mode sends without a limit (an error there, WRONGTYPE say, is the reply);
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
-- A stored field as a number (nil when absent); a field that is not one makes the client's
-- state unreadable: an error for that client, never a reset nor another client's failure.
local function num(v, key)
  if not v then return nil end
  local n = tonumber(v)
  if n == nil then error('ERR the limit state in ' .. key .. ' is not a number', 0) end
  return n
end
-- An error caught by pcall as an error reply's text (a table before Redis 7, a string since).
local function failure(e)
  local msg = type(e) == 'table' and e.err or tostring(e)
  if not string.match(msg, '^%u+ ') then msg = 'ERR limit state: ' .. msg end
  return msg
end
"""

# Per algorithm: `load(key)` -> state, `add(state, n)` -> state, `store(key, state)`,
# `decide(state)` -> allowed, remaining, reset, retry_after, new state; `dump(state)` -> array.
_FIXED = """
local function load(key)
  local s = redis.call('HMGET', key, 'w', 'c')
  local w = math.floor(now / period)
  if num(s[1], key) == w then return {w, num(s[2], key) or 0} end
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
  local w0 = num(s[1], key)
  local c, p = num(s[2], key) or 0, num(s[3], key) or 0
  if w0 == w then return {w, c, p} end
  if w0 == w - 1 then return {w, 0, c} end
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
local function load(key) return {num(redis.call('GET', key), key) or 0} end
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
local ok, state = pcall(load, KEYS[2])
if not ok then return {err = failure(state)} end  -- before the INCRBY: the request is not counted
local total = redis.pcall('INCRBY', KEYS[1], 1)
if type(total) == 'table' and total.err then return total end
local allowed, remaining, reset, retry, s = decide(state)
if allowed == 1 then store(KEYS[2], s) end
return {total, allowed, remaining, math.ceil(reset), math.ceil(retry)}
"""

# KEYS[1]: the process' sequence marker; then (total key, limit key) per client.
# ARGV: limit, period_us, burst, seq, marker TTL, then (increments, allowed) per client.
# Returns {applied, now_us, {index, error, ...}, {state, state, ...}} (index from 1); a client
# whose limit state cannot be read has the error and an empty state, and nothing applied.
# Nothing here may abort the script: the clients before it would be applied and the sequence
# marker not set, so the gateway would resend the batch and apply them again.
_FLUSH = """
local seq = tonumber(ARGV[4])
local applied = seq > tonumber(redis.call('GET', KEYS[1]) or '0')
local errors, states = {}, {}
for i = 1, (#KEYS - 1) / 2 do
  local tkey, lkey = KEYS[2 * i], KEYS[2 * i + 1]
  local ok, s = pcall(load, lkey)
  if not ok then
    errors[#errors + 1] = i
    errors[#errors + 1] = failure(s)
    states[i] = {}
  else
    if applied then
      local r = redis.pcall('INCRBY', tkey, ARGV[4 + 2 * i])
      if type(r) == 'table' and r.err then
        errors[#errors + 1] = i
        errors[#errors + 1] = r.err
      else
        -- Quota only for counted requests, as in the decision script.
        local n = tonumber(ARGV[5 + 2 * i])
        if n > 0 then
          s = add(s, n)
          store(lkey, s)
        end
      end
    end
    states[i] = dump(s)
  end
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
