-- The bench's 3-limit plan as one Lua script, for `make bench` to compare with
-- RL.ACQUIRE: what a careful user would write instead of the module.
--
-- For every key in KEYS (one subject each, all in one slot), three limits:
--   a sliding window kept as PRECISION slices (usage = the last PRECISION + 1 slices,
--   as Tollgate counts it), a fixed window aligned on multiples of its length, and a
--   token bucket kept as a GCRA debt. The call is admitted only if every limit of
--   every key admits it; then every key is charged, otherwise none is. One GET and,
--   when admitted, one SET ... PX per key; the state is packed with struct (no
--   hashes, no per-field calls). Exact integer arithmetic while values stay below
--   2^53 (the bench's do).
--
-- ARGV: request cost, token cost, sliding capacity, sliding window ms, precision,
--       fixed capacity, fixed window ms, bucket burst, bucket window ms.
-- Reply, like RL.ACQUIRE ... COMPACT: allowed, retry_after_ms, index of the first
-- denying limit or -1, then key by key: fallbacks taken (always 0 here), remaining
-- and reset_ms of every limit.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local req, tok = tonumber(ARGV[1]), tonumber(ARGV[2])
local scap, swin, prec = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local fcap, fwin = tonumber(ARGV[6]), tonumber(ARGV[7])
local burst, bwin = tonumber(ARGV[8]), tonumber(ARGV[9])

local ring = prec + 1
local slice = swin / prec -- whole milliseconds: the window is a multiple of precision
local snow = math.floor(now / slice)
local fidx = math.floor(now / fwin)
local bcap = burst * bwin -- debt is kept in token-milliseconds; it drains at `burst` a ms
-- State: updated, the ring (ring words), fixed used, bucket instant, bucket debt.
local FIELDS = ring + 4
local FIXED, BT0, BDEBT = ring + 2, ring + 3, ring + 4
local fmt = string.rep('d', FIELDS)

local allowed, retry, denied = 1, 0, -1
local states, used_s, used_f, debts = {}, {}, {}, {}

local function deny(index, after)
  allowed = 0
  if denied < 0 then denied = index end
  if after > retry then retry = after end
end

for k = 1, #KEYS do
  local raw = redis.call('GET', KEYS[k])
  local s
  if raw then
    s = { struct.unpack(fmt, raw) }
    s[FIELDS + 1] = nil -- unpack's next position
  else
    s = {}
    for i = 1, FIELDS do s[i] = 0 end
  end
  -- Sliding: move the ring from the slice of `updated` to the slice of now.
  local from = math.floor(s[1] / slice)
  local shift = snow - from
  if shift >= ring then
    for i = 2, ring + 1 do s[i] = 0 end
  elseif shift > 0 then
    for x = from + 1, snow do s[2 + x % ring] = 0 end
  end
  local used = 0
  for i = 2, ring + 1 do used = used + s[i] end
  used_s[k] = used
  local base = (k - 1) * 3
  if used + req > scap then
    -- The oldest slices slide out first.
    local left = used
    for y = snow - prec, snow do
      left = left - s[2 + y % ring]
      if left + req <= scap then
        deny(base, (y + ring) * slice - now)
        break
      end
    end
  end
  -- Fixed window.
  if math.floor(s[1] / fwin) ~= fidx then s[FIXED] = 0 end
  used_f[k] = s[FIXED]
  if s[FIXED] + req > fcap then deny(base + 1, (fidx + 1) * fwin - now) end
  -- Token bucket.
  local debt = s[BDEBT] - burst * (now - s[BT0])
  if debt < 0 then debt = 0 end
  debts[k] = debt
  local over = debt + tok * bwin - bcap
  if over > 0 then deny(base + 2, math.ceil(over / burst)) end
  states[k] = s
end

local reply = { allowed, retry, denied }
for k = 1, #KEYS do
  local s = states[k]
  local used, fused, debt = used_s[k], used_f[k], debts[k]
  if allowed == 1 then
    local i = 2 + snow % ring
    s[i] = s[i] + req
    s[FIXED] = fused + req
    debt = debt + tok * bwin
    s[BT0], s[BDEBT] = now, debt
    s[1] = now
    used, fused = used + req, fused + req
    -- The key lives until every limit is idle again.
    local ttl = (snow + ring) * slice - now
    local fend = (fidx + 1) * fwin - now
    if fused > 0 and fend > ttl then ttl = fend end
    local drain = math.ceil(debt / burst)
    if drain > ttl then ttl = drain end
    redis.call('SET', KEYS[k], struct.pack(fmt, unpack(s)), 'PX', math.max(ttl, 1))
  end
  -- Sliding reset: when the newest used slice slides out.
  local sreset = 0
  if used > 0 then
    local newest = snow
    if allowed == 0 or req == 0 then
      newest = nil
      for y = snow, snow - prec, -1 do
        if s[2 + y % ring] > 0 then newest = y; break end
      end
    end
    if newest then sreset = (newest + ring) * slice - now end
  end
  local fr = 0
  if fused > 0 then fr = (fidx + 1) * fwin - now end
  local br = bcap - debt
  if br < 0 then br = 0 end
  reply[#reply + 1] = 0
  reply[#reply + 1] = math.max(scap - used, 0)
  reply[#reply + 1] = sreset
  reply[#reply + 1] = math.max(fcap - fused, 0)
  reply[#reply + 1] = fr
  reply[#reply + 1] = math.floor(br / bwin)
  reply[#reply + 1] = math.ceil(debt / burst)
end
return reply
