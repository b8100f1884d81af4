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
  timeout = tonumber(env("REF_TIMEOUT_MS", "1000")) / 1000,
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

local function client_ip(txn)
  local peer = ipaddr.canonical(txn.sf:src()) or txn.sf:src()
  if #trusted == 0 or not is_trusted(peer) then
    return peer
  end
  local xff = txn.sf:req_fhdr("x-forwarded-for")
  if xff == nil or xff == "" then
    return peer
  end
  -- req_fhdr returns the last occurrence only; several headers are joined like the gateway does.
  local all = {}
  local hdrs = txn.http:req_get_headers()["x-forwarded-for"]
  if hdrs ~= nil then
    for i = 0, #hdrs do
      if hdrs[i] ~= nil then
        all[#all + 1] = hdrs[i]
      end
    end
    xff = table.concat(all, ",")
  end
  local entries = {}
  for entry in (xff .. ","):gmatch("([^,]*),") do
    entries[#entries + 1] = entry
  end
  local chosen = peer
  for i = #entries, 1, -1 do
    local ip = ipaddr.canonical(entries[i])
    if ip == nil then
      return peer
    end
    chosen = ip
    if not is_trusted(ip) then
      return ip
    end
  end
  return chosen
end

local function resp_incr(key)
  return string.format("*3\r\n$6\r\nINCRBY\r\n$%d\r\n%s\r\n$1\r\n1\r\n", #key, key)
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
  local key = cfg.prefix .. client_ip(txn)
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

-- Runs `incr(conn, key)` on a pooled connection; the connection goes back to
-- the pool when `incr` says the stream is still in sync, and is renewed otherwise.
-- No connection within the wait: the request goes through uncounted.
local function with_pooled(incr)
  return function(txn)
    local key = cfg.prefix .. client_ip(txn)
    local conn = pool:get(cfg.pool_wait)
    if conn == nil then
      return
    end
    if incr(conn, key) then
      pool:release(conn)
    else
      pool:renew(conn)
    end
  end
end

core.register_action("acct-pooled", { "http-req" }, with_pooled(function(conn, key)
  -- pcall: redis-lua raises on any error, and an error escaping an action
  -- would abort the request and leak the connection (the seed's note).
  return (pcall(conn.client.incrby, conn.client, key, 1))
end))

core.register_action("acct-raw", { "http-req" }, with_pooled(function(conn, key)
  if conn.tcp:send(resp_incr(key)) == nil then
    return false
  end
  local line = conn.tcp:receive("*l")
  -- nil: timeout or closed, the reply may still come, so never reuse. An integer
  -- or an error reply (WRONGTYPE...) leaves the stream in sync; anything else does not.
  return line ~= nil and (line:sub(1, 1) == ":" or line:sub(1, 1) == "-")
end))

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
