-- ipaddr.lua: canonical text of an IP address, the same rules as the gateway's client_ip.py.
--
-- IPv4: four decimal octets, no leading zeros. IPv6: expanded, then printed
-- lowercase with the longest run of two or more zero groups as "::" (RFC 5952,
-- as Python's ipaddress prints it); an IPv4-mapped address (::ffff:a.b.c.d)
-- becomes plain IPv4. Written in Lua because HAProxy 2.6's string-to-address
-- cast only yields IPv4 from Lua.

local M = {}

local function ipv4_octets(text)
  local a, b, c, d = text:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if a == nil then
    return nil
  end
  local out = {}
  for _, part in ipairs({ a, b, c, d }) do
    if #part > 3 or (#part > 1 and part:sub(1, 1) == "0") then
      return nil
    end
    local n = tonumber(part)
    if n > 255 then
      return nil
    end
    out[#out + 1] = n
  end
  return out
end

local function ipv6_groups(text)
  -- An embedded IPv4 tail counts as two groups.
  local head, v4 = text:match("^(.*:)(%d+%.%d+%.%d+%.%d+)$")
  local tail = {}
  if head ~= nil then
    local o = ipv4_octets(v4)
    if o == nil then
      return nil
    end
    tail = { o[1] * 256 + o[2], o[3] * 256 + o[4] }
    text = head
    if text:sub(-2) ~= "::" then
      text = text:sub(1, -2)
    end
  end
  local function parse(part)
    local groups = {}
    if part == "" then
      return groups
    end
    for g in (part .. ":"):gmatch("([^:]*):") do
      if not g:match("^%x%x?%x?%x?$") then
        return nil
      end
      groups[#groups + 1] = tonumber(g, 16)
    end
    return groups
  end
  local left, right = text:match("^(.-)::(.*)$")
  local groups
  if left ~= nil then
    if right:find("::", 1, true) then
      return nil
    end
    local l, r = parse(left), parse(right)
    if l == nil or r == nil then
      return nil
    end
    for _, g in ipairs(tail) do
      r[#r + 1] = g
    end
    local fill = 8 - #l - #r
    if fill < 1 then
      return nil
    end
    groups = l
    for _ = 1, fill do
      groups[#groups + 1] = 0
    end
    for _, g in ipairs(r) do
      groups[#groups + 1] = g
    end
  else
    groups = parse(text)
    if groups == nil then
      return nil
    end
    for _, g in ipairs(tail) do
      groups[#groups + 1] = g
    end
    if #groups ~= 8 then
      return nil
    end
  end
  return groups
end

local function ipv6_text(groups)
  local best_start, best_len, run_start, run_len = 0, 0, 0, 0
  for i = 1, 8 do
    if groups[i] == 0 then
      if run_len == 0 then
        run_start = i
      end
      run_len = run_len + 1
      if run_len > best_len then
        best_start, best_len = run_start, run_len
      end
    else
      run_len = 0
    end
  end
  local hex = {}
  for i = 1, 8 do
    hex[i] = string.format("%x", groups[i])
  end
  if best_len < 2 then
    return table.concat(hex, ":")
  end
  local left = table.concat(hex, ":", 1, best_start - 1)
  local right = table.concat(hex, ":", best_start + best_len, 8)
  return left .. "::" .. right
end

-- Canonical text of an address as found in a peer name or an X-Forwarded-For
-- entry (optional port, brackets, zone), or nil if it is not an address.
function M.canonical(text)
  text = text:match("^%s*(.-)%s*$")
  if text == "" or #text > 64 then
    return nil
  end
  if text:sub(1, 1) == "[" then
    local inner, rest = text:match("^%[([^%]]*)%](.*)$")
    if inner == nil or (rest ~= "" and rest:match("^:") == nil) then
      return nil
    end
    text = inner
  elseif select(2, text:gsub(":", "")) == 1 then
    text = text:match("^([^:]*)")
  end
  text = text:gsub("%%.*$", "")
  local o = ipv4_octets(text)
  if o ~= nil then
    return string.format("%d.%d.%d.%d", o[1], o[2], o[3], o[4])
  end
  if not text:find(":", 1, true) or text:find("[^%x%.:]") then
    return nil
  end
  local g = ipv6_groups(text)
  if g == nil then
    return nil
  end
  if g[1] == 0 and g[2] == 0 and g[3] == 0 and g[4] == 0 and g[5] == 0 and g[6] == 0xffff then
    return string.format("%d.%d.%d.%d", g[7] // 256, g[7] % 256, g[8] // 256, g[8] % 256)
  end
  return ipv6_text(g)
end

return M
