-- redis_pool.lua: the seed's connection pool wrapper around redis-lua, made to run.
--
-- Follows the seed:
--   * nb_max caps the connections; nb_cur counts them and is incremented
--     *before* connect(), because connect() yields to HAProxy and another
--     request's Lua would otherwise see a free slot too and overshoot nb_max;
--   * nb_avail counts idle connections, nb_err counts failures;
--   * get(wait) pops an idle connection, else creates one if a slot is free,
--     else sleeps 50 ms (core.msleep) and retries until `wait` ms are spent;
--   * release() gives a connection back; renew() replaces a broken one.
--
-- Departs from the seed, to run and to be correct:
--   * the seed's excerpt omits every `end`, the FIFO, and what release/renew
--     do with the connection; they are written out here;
--   * a failed connect is closed and its slot freed (the seed leaks the socket);
--   * renew() closes the broken socket and frees its slot before trying a new
--     connection, so nb_cur never counts a dead connection;
--   * AUTH and SELECT are sent on connect when configured (the seed has neither);
--   * a socket timeout is set only when configured (timeout > 0): on HAProxy 2.6 a cosocket
--     with a timeout now and then resumes its reader only when that timeout expires, although
--     the reply is there, and the request and its pooled connection stand still that long
--     (docs/reference.md). Without one, HAProxy's own Lua socket timeouts apply;
--   * nb_wait_timeout counts get() calls that gave up (requests let through uncounted).

local Fifo = require("fifo")

local Pool = {}
Pool.__index = Pool

function Pool.new(opts)
  local p = setmetatable({}, Pool)
  p.host = opts.host
  p.port = opts.port
  p.password = opts.password
  p.db = opts.db or 0
  p.timeout = opts.timeout or 0 -- seconds; 0: HAProxy's own socket timeouts
  p.redis = opts.redis -- the redis-lua module, or nil for raw-only use
  p.pool = Fifo.new()
  p.nb_max = opts.size
  p.nb_cur = 0
  p.nb_avail = 0
  p.nb_err = 0
  p.nb_wait_timeout = 0 -- get() gave up: the request goes through uncounted
  return p
end

-- Open a socket to Redis and log in. Returns the socket, or nil and a reason.
function Pool:connect_socket()
  local tcp = core.tcp()
  if self.timeout > 0 then
    tcp:settimeout(self.timeout)
  end
  if tcp:connect(self.host, self.port) == nil then
    tcp:close()
    return nil, "connect failed"
  end
  local hello = ""
  if self.password ~= nil and self.password ~= "" then
    hello = hello .. string.format("*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n", #self.password, self.password)
  end
  if self.db ~= 0 then
    local db = tostring(self.db)
    hello = hello .. string.format("*2\r\n$6\r\nSELECT\r\n$%d\r\n%s\r\n", #db, db)
  end
  if hello ~= "" then
    if tcp:send(hello) == nil then
      tcp:close()
      return nil, "send failed"
    end
    local replies = (self.password ~= nil and self.password ~= "" and 1 or 0) + (self.db ~= 0 and 1 or 0)
    for _ = 1, replies do
      local line = tcp:receive("*l")
      if line == nil or line:sub(1, 1) ~= "+" then
        tcp:close()
        return nil, "AUTH/SELECT refused: " .. tostring(line)
      end
    end
  end
  return tcp
end

function Pool:new_conn()
  if self.nb_cur >= self.nb_max then
    return nil
  end
  -- Reserve the slot before connecting: connect() yields (see the header).
  self.nb_cur = self.nb_cur + 1
  local tcp = self:connect_socket()
  if tcp == nil then
    self.nb_cur = self.nb_cur - 1
    self.nb_err = self.nb_err + 1
    return nil
  end
  local conn = { tcp = tcp }
  if self.redis ~= nil then
    conn.client = self.redis.connect({ socket = tcp })
  end
  -- One more connection, counted as available until get() hands it out.
  self.nb_avail = self.nb_avail + 1
  return conn
end

function Pool:get(wait)
  local spent = 0
  while true do
    local conn = self.pool:pop()
    if conn ~= nil then
      self.nb_avail = self.nb_avail - 1
      return conn
    end
    if self.nb_cur < self.nb_max then
      conn = self:new_conn()
      if conn ~= nil then
        self.nb_avail = self.nb_avail - 1
        return conn
      end
    end
    if spent >= wait then
      self.nb_wait_timeout = self.nb_wait_timeout + 1
      return nil
    end
    -- The seed's fixed-step poll: nothing wakes a waiter when a connection is released.
    core.msleep(50)
    spent = spent + 50
  end
end

function Pool:release(conn)
  self.nb_avail = self.nb_avail + 1
  self.pool:push(conn)
end

-- The connection is broken (error, timeout, unread reply): close it, free its
-- slot, and put a fresh one in the pool if Redis takes it.
function Pool:renew(conn)
  if conn ~= nil then
    conn.tcp:close()
  end
  self.nb_cur = self.nb_cur - 1
  self.nb_err = self.nb_err + 1
  local fresh = self:new_conn()
  if fresh ~= nil then
    self.pool:push(fresh)
  end
end

return Pool
