-- wrk script: spread requests over a pool of client addresses sent in X-Forwarded-For.
-- Arguments (after --): COUNT [uniform|skewed] [SEED]
--   COUNT   number of distinct client addresses (0 or 1: no header, the injector's own address)
--   skewed  picks addresses with a Zipf-like skew (a few clients send most requests)
-- Each thread builds its request strings once, so per request wrk only picks one.

local requests = {}
local skewed = false

function init(args)
  local count = tonumber(args[1] or "1")
  skewed = args[2] == "skewed"
  math.randomseed(tonumber(args[3] or "1"))
  if count <= 1 then
    requests[1] = wrk.format("GET", "/")
    return
  end
  for i = 0, count - 1 do
    -- wrk embeds LuaJIT (Lua 5.1): no integer division operator.
    local ip = string.format("10.%d.%d.%d", math.floor(i / 65536) % 256, math.floor(i / 256) % 256, i % 256)
    requests[#requests + 1] = wrk.format("GET", "/", { ["X-Forwarded-For"] = ip })
  end
end

function request()
  local n = #requests
  if n == 1 then
    return requests[1]
  end
  local i
  if skewed then
    -- index ~ n^u: low indexes are far more likely (roughly Zipf with s=1)
    i = math.floor(n ^ math.random())
    if i < 1 then i = 1 end
  else
    i = math.random(n)
  end
  return requests[i]
end
