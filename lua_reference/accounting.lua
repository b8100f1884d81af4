-- accounting.lua: the HAProxy+Lua original's actions, written to run beside the gateway.
--
-- Three actions, one per accounting mode of the seed:
--   lua.acct-naive   connect, INCRBY through redis-lua, close: the seed's "basic usage"
--   lua.acct-pooled  redis-lua over the pool (redis_pool.lua): "Redis with pools"
--   lua.acct-raw     the same pool, RESP written by hand: "without Redis library"
-- Each sends INCRBY <prefix><client-ip> 1 and never fails the request: any
-- Redis error lets the request through (the seed's behaviour), and the
-- connection goes back to the pool or is renewed on every path.
--
-- Departs from the seed:
--   * the raw action sends well-formed, length-prefixed RESP with the real
--     client address (the seed's excerpt hard-codes 127.0.0.1 and has empty
--     length fields), and reads the reply as an integer instead of any line;
--   * the key has the gateway's prefix, and the client address follows the
--     gateway's rule: the peer, or, when the peer is a trusted proxy, the
--     rightmost X-Forwarded-For entry that is not itself trusted; a header
--     with an entry that is not an address is ignored.
--
-- Settings come from the environment (see haproxy/run.sh for the defaults).

local Pool = require("redis_pool")
local redis = require("redis")
local ipaddr = require("ipaddr")

local function env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then
    return default
  end
  return v
end

local cfg = {
  host = env("REF_REDIS_HOST", "127.0.0.1"),
  port = tonumber(env("REF_REDIS_PORT", "6379")),
  password = env("REF_REDIS_PASSWORD", nil),
  db = tonumber(env("REF_REDIS_DB", "0")),
  pool_size = tonumber(env("REF_POOL_SIZE", "20")),
  pool_wait = tonumber(env("REF_POOL_WAIT_MS", "1000")),
  timeout = tonumber(env("REF_TIMEOUT_MS", "0")) / 1000, -- 0: not set (see redis_pool.lua)
  prefix = env("REF_KEY_PREFIX", "ip:"),
}

local trusted = {}
for cidr in string.gmatch(env("REF_TRUSTED_PROXIES", ""), "[^,%s]+") do
  local net = core.parse_addr(cidr)
  if net == nil then
    error("REF_TRUSTED_PROXIES: not an address or CIDR: " .. cidr)
  end
  trusted[#trusted + 1] = net
end

local function is_trusted(ip)
  local addr = core.parse_addr(ip)
  if addr == nil then
    return false
  end
  for _, net in ipairs(trusted) do
    if core.match_addr(net, addr) then
      return true
    end
  end
  return false
end

local function resp_incr(key)
  return string.format("*3\r\n$6\r\nINCRBY\r\n$%d\r\n%s\r\n$1\r\n1\r\n", #key, key)
end

-- The per-request path does no more than the seed's: one table lookup turns the peer address into
-- the client's key and its RESP command, both built once per address. The caches are cleared
-- when they reach CACHE_MAX entries, which bounds them when many addresses come and go.
local CACHE_MAX = 10000

-- canonical client address -> { key = "<prefix><ip>", cmd = "*3\r\n$6\r\nINCRBY..." }
local clients, clients_n = {}, 0
local function client(ip)
  local c = clients[ip]
  if c == nil then
    if clients_n >= CACHE_MAX then
      clients, clients_n = {}, 0
    end
    local key = cfg.prefix .. ip
    c = { key = key, cmd = resp_incr(key) }
    clients[ip] = c
    clients_n = clients_n + 1
  end
  return c
end

-- peer address as HAProxy gives it -> { client = client(canonical peer), trusted = is_trusted(...) }
-- IPv4 comes canonical from HAProxy; only an IPv6 text (which may embed an IPv4-mapped address)
-- is parsed, and only the first time it is seen.
local peers, peers_n = {}, 0
local function peer(src)
  local p = peers[src]
  if p == nil then
    if peers_n >= CACHE_MAX then
      peers, peers_n = {}, 0
    end
    local ip = src
    if src:find(":", 1, true) then
      ip = ipaddr.canonical(src) or src
    end
    p = { client = client(ip), trusted = #trusted > 0 and is_trusted(ip) }
    peers[src] = p
    peers_n = peers_n + 1
  end
  return p
end

-- The client named by X-Forwarded-For (all occurrences joined with ","), or nil to keep the
-- peer: the rightmost entry that is not a trusted proxy; nil if an entry is not an address.
local function from_xff(xff)
  local entries = {}
  for entry in (xff .. ","):gmatch("([^,]*),") do
    entries[#entries + 1] = entry
  end
  local chosen = nil
  for i = #entries, 1, -1 do
    local ip = ipaddr.canonical(entries[i])
    if ip == nil then
      return nil
    end
    chosen = ip
    if not is_trusted(ip) then
      return ip
    end
  end
  return chosen
end

-- header text -> client(...) or false (keep the peer); the same text always names the same client.
local by_xff, by_xff_n = {}, 0

-- The client record for this request: the peer, or, when the peer is a trusted proxy, the client
-- its X-Forwarded-For names.
local function client_of(txn)
  local p = peer(txn.sf:src())
  if not p.trusted then
    return p.client
  end
  local xff = txn.sf:req_fhdr("x-forwarded-for")
  if xff == nil or xff == "" then
    return p.client
  end
  -- req_fhdr returns the last occurrence only; several headers are joined like the gateway does.
  local hdrs = txn.http:req_get_headers()["x-forwarded-for"]
  if hdrs ~= nil and hdrs[1] ~= nil then
    local all = {}
    for i = 0, #hdrs do
      if hdrs[i] ~= nil then
        all[#all + 1] = hdrs[i]
      end
    end
    xff = table.concat(all, ",")
  end
  local c = by_xff[xff]
  if c == nil then
    if by_xff_n >= CACHE_MAX then
      by_xff, by_xff_n = {}, 0
    end
    local ip = from_xff(xff)
    c = ip ~= nil and client(ip) or false
    by_xff[xff] = c
    by_xff_n = by_xff_n + 1
  end
  return c or p.client
end

-- One pool, shared by every request handled by this Lua state.
local pool = Pool.new({
  host = cfg.host,
  port = cfg.port,
  password = cfg.password,
  db = cfg.db,
  size = cfg.pool_size,
  timeout = cfg.timeout,
  redis = redis,
})

core.register_action("acct-naive", { "http-req" }, function(txn)
  local key = client_of(txn).key
  local tcp = pool:connect_socket()
  if tcp == nil then
    return
  end
  local client = redis.connect({ socket = tcp })
  pcall(client.incrby, client, key, 1)
  -- QUIT makes Redis drop the connection now. HAProxy closes a cosocket
  -- asynchronously, and under load the closes lag behind the connects until
  -- Redis's maxclients is reached and INCRBYs are refused.
  pcall(client.quit, client)
  tcp:close()
end)

-- Runs `incr(conn, client)` on a pooled connection; the connection goes back to
-- the pool when `incr` says the stream is still in sync, and is renewed otherwise.
-- No connection within the wait: the request goes through uncounted.
local function with_pooled(incr)
  return function(txn)
    local c = client_of(txn)
    local conn = pool:get(cfg.pool_wait)
    if conn == nil then
      return
    end
    if incr(conn, c) then
      pool:release(conn)
    else
      pool:renew(conn)
    end
  end
end

core.register_action("acct-pooled", { "http-req" }, with_pooled(function(conn, c)
  -- pcall: redis-lua raises on any error, and an error escaping an action
  -- would abort the request and leak the connection (the seed's note).
  return (pcall(conn.client.incrby, conn.client, c.key, 1))
end))

local COLON, MINUS = string.byte(":"), string.byte("-")

core.register_action("acct-raw", { "http-req" }, with_pooled(function(conn, c)
  if conn.tcp:send(c.cmd) == nil then
    return false
  end
  local line = conn.tcp:receive("*l")
  -- nil: timeout or closed, the reply may still come, so never reuse. An integer
  -- or an error reply (WRONGTYPE...) leaves the stream in sync; anything else does not.
  if line == nil then
    return false
  end
  local first = line:byte(1)
  return first == COLON or first == MINUS
end))

-- The client's counter key in txn.client_key, for a stick table to track (the raw-limited
-- listener): the same client, X-Forwarded-For included, as the accounting counts.
core.register_action("acct-client-key", { "http-req" }, function(txn)
  txn:set_var("txn.client_key", client_of(txn).key)
end)

-- Pool counters for tests and operators: GET on the admin listener.
core.register_service("acct-stats", "http", function(applet)
  local body = string.format(
    '{"nb_max": %d, "nb_cur": %d, "nb_avail": %d, "nb_err": %d, "nb_wait_timeout": %d, "idle": %d}\n',
    pool.nb_max, pool.nb_cur, pool.nb_avail, pool.nb_err, pool.nb_wait_timeout, pool.pool:size()
  )
  applet:set_status(200)
  applet:add_header("content-type", "application/json")
  applet:add_header("content-length", tostring(#body))
  applet:start_response()
  applet:send(body)
end)
