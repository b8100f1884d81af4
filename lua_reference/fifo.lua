-- fifo.lua: a first-in first-out queue, O(1) push and pop.
--
-- The seed's pool relies on a FIFO "described elsewhere" that it does not show;
-- this is a plain two-index queue. Popping the oldest idle connection spreads
-- use across the pool, as the seed's pool:pop() does.

local Fifo = {}
Fifo.__index = Fifo

function Fifo.new()
  return setmetatable({ first = 1, last = 0, items = {} }, Fifo)
end

function Fifo:push(item)
  self.last = self.last + 1
  self.items[self.last] = item
end

function Fifo:pop()
  if self.first > self.last then
    return nil
  end
  local item = self.items[self.first]
  self.items[self.first] = nil
  self.first = self.first + 1
  return item
end

function Fifo:size()
  return self.last - self.first + 1
end

return Fifo
