-- One decision of the shared quota, atomically, on the server's own clock (TIME).
--
-- KEYS: 1 state (hash: running sums, the two paces, the hold, the last 429), 2 log (zset: ticket
-- id -> when it leaves the log), 3 charges (hash: ticket id -> tokens charged, negative until its
-- count is known: an answer, a refund, or a worker's carry), 4 workers (zset:
-- worker id -> last seen), 5 line (zset: "id|tokens" -> first refusal), 6 due (zset: "id|tokens"
-- -> time by which it must be back), 7 counts (list: the server's count over the charge asked,
-- of the last settled requests of any worker). Times are microseconds of the server's clock.
-- ARGV: 1 op, 2 window, 3 log tokens, 4 log requests (the account's own limits), 5 pace tokens,
-- 6 pace requests (the limits less the headroom), 7 burst, 8 lead, 9 how long an unanswered
-- admission stays in the log, then the op's own:
--   acquire ticket tokens worker grace
--       -> {admitted 0/1, wait (us), live workers, tpm factor, rpm factor, tokens charged}
--       admitted: the request may be sent after `wait`; refused: it has a place in the line and
--       must ask again after `wait` (and within `grace` of it, or lose its place). The charge is
--       `tokens` times the largest count over charge of the last settled requests (at least 1):
--       a worker whose charges fall short learns it for every worker, and until its request is
--       settled the log holds what the server will likely count.
--   settle ticket tokens asked   -> {1 if the ticket was still in the window, else 0}
--   refund ticket tokens         -> {1 if the ticket was still in the window, else 0}
--   cut kind retry_after         -> {1}       kind: "tpm", "rpm" or "" (both)
--   carry worker (ticket tokens left)*  -> {tickets added, restoring (us)}
--       a worker's admissions of the window after an outage: those the log lacks (made while
--       Redis was unreachable, or before it restarted empty) join it, each leaving `left` from
--       now; those it holds take the count the worker settled meanwhile. A carry into an empty
--       state starts a window of restoring: until every worker has carried its own, the log
--       holds only part of what the server's window counts, and workers pace on locally.
-- Factors are in millionths.
--
-- An admission leaves the log a window after its answer (settle), when the server has counted it
-- at the latest; one never answered, `unanswered` after the time booked for it. The log holds the
-- account's own limits and the pace the headroom's, as the local limiter does, and like it holds
-- an admission whose count is not known yet at its charge and MARGIN more (an estimate, and the
-- log is often full to the last percent).

local CUT, FLOOR, CUT_SPACING, IDLE_SHARE, MARGIN = 0.8, 0.25, 0.1, 0.5, 0.15
-- Counts over charges: of the last COUNTS requests of at least COUNT_MIN tokens (a short text's
-- ratio says little), the largest, never above COUNT_MAX (a runaway would stop everyone).
local COUNTS, COUNT_MIN, COUNT_MAX = 32, 256, 1.25

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local op = ARGV[1]
local window = tonumber(ARGV[2])
local log_t, log_r = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_t, max_r = tonumber(ARGV[5]), tonumber(ARGV[6])
local burst, lead = tonumber(ARGV[7]), tonumber(ARGV[8])
local unanswered = tonumber(ARGV[9])
local A = 10  -- the op's own arguments start here

-- Numbers handed to redis.call are otherwise printed with 14 digits, which loses microseconds.
local function int(x) return string.format('%.0f', x) end
local function real(x) return string.format('%.17g', x) end

local fields = {'tokens', 'requests', 't_tat', 'r_tat', 't_cut', 'r_cut', 't_cut_at', 'r_cut_at',
  'hold', 'limited_at', 'restored_at', 'over', 'pending'}
local raw = redis.call('HMGET', KEYS[1], unpack(fields))
local fresh = not raw[1]  -- no state: a first call, a restart, or nobody called for a window
local s = {}
for i, name in ipairs(fields) do s[name] = tonumber(raw[i]) end
s.tokens = s.tokens or 0
s.requests = s.requests or 0
s.t_tat = s.t_tat or -1e300
s.r_tat = s.r_tat or -1e300
s.t_cut = s.t_cut or 1
s.r_cut = s.r_cut or 1
s.t_cut_at = s.t_cut_at or -1e300
s.r_cut_at = s.r_cut_at or -1e300
s.hold = s.hold or -1e300
s.limited_at = s.limited_at or -1e300
s.restored_at = s.restored_at or -1e300
s.over = s.over or 1
s.pending = s.pending or 0  -- the charges in the log whose count is not known yet

-- Admissions whose time is up leave the log (unpack is kept under Lua's stack limit).
local function each_chunk(list, fn)
  for i = 1, #list, 1000 do fn({unpack(list, i, math.min(i + 999, #list))}) end
end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', int(now))
if #old > 0 then
  each_chunk(old, function(ids)
    for _, charge in ipairs(redis.call('HMGET', KEYS[3], unpack(ids))) do
      local c = tonumber(charge) or 0
      s.tokens = s.tokens - math.abs(c)
      if c < 0 then s.pending = s.pending + c end
    end
    redis.call('HDEL', KEYS[3], unpack(ids))
  end)
  s.requests = s.requests - #old
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', int(now))
end

-- The pace (GCRA) of one resource: its rate climbs back linearly over a window after a cut.
local function factor(kind, at)
  local cut = s[kind .. '_cut']
  if cut >= 1 then return 1 end
  return math.min(1, cut + (1 - cut) * ((at - s[kind .. '_cut_at']) / window))
end
local function rate(kind, limit, at) return limit * factor(kind, at) / window end

-- What the log holds for admissions of `tokens` not yet answered: never more than the limit, so
-- that one alone always fits.
local function held(tokens) return math.min(tokens * (1 + MARGIN), log_t) end

-- When enough admissions will have left the log for `requests` more requests of `tokens` in all.
local function log_ready(tokens, requests)
  local extra_t = s.tokens + s.pending * MARGIN + held(tokens) - log_t
  local extra_r = s.requests + requests - log_r
  if extra_t <= 0 and extra_r <= 0 then return now end
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local freed_t, freed_r = 0, 0
  for i = 1, #entries, 2 do
    local c = tonumber(redis.call('HGET', KEYS[3], entries[i])) or 0
    freed_t = freed_t + (c < 0 and -c * (1 + MARGIN) or c)
    freed_r = freed_r + 1
    if freed_t >= extra_t and freed_r >= extra_r then return tonumber(entries[i + 1]) end
  end
  return now + unanswered
end

-- Pace left unspent is kept up to half a window (the log still holds the window to the limit),
-- none within a window of a 429, and none before the first admission of a fresh state nor in the
-- window after one was restored: workers pacing locally left the shared pace behind, and a
-- burst into a server window that is still full would meet it at its limit.
local function charge(kind, cost, limit, at)
  local tat = s[kind .. '_tat']
  local idle = IDLE_SHARE * window
  if now - s.limited_at < window or now - s.restored_at < 2 * window then idle = 0 end
  if tat < -1e299 then tat = at end
  s[kind .. '_tat'] = math.max(tat, at - idle) + cost / rate(kind, limit, at)
end

local function save()
  redis.call('HSET', KEYS[1], 'tokens', int(s.tokens), 'requests', int(s.requests),
    't_tat', real(s.t_tat), 'r_tat', real(s.r_tat), 't_cut', real(s.t_cut), 'r_cut', real(s.r_cut),
    't_cut_at', int(s.t_cut_at), 'r_cut_at', int(s.r_cut_at), 'hold', int(s.hold),
    'limited_at', int(s.limited_at), 'restored_at', int(s.restored_at), 'over', real(s.over),
    'pending', int(s.pending))
  -- Nothing outlives the window it describes: the state is gone a window after the last call.
  local ttl = int(math.ceil((unanswered + lead + math.max(0, s.hold - now)) / 1000))
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
end

-- Move a live ticket's charge to `tokens` and `requests` in the sums and the paces.
local function recharge(id, tokens, requests)
  local charged = tonumber(redis.call('HGET', KEYS[3], id))
  if charged == nil then return 0 end
  if charged < 0 then  -- its count is known now
    charged = -charged
    s.pending = s.pending - charged
  end
  s.tokens = s.tokens + tokens - charged
  s.requests = s.requests + requests - 1
  s.t_tat = s.t_tat + (tokens - charged) / rate('t', max_t, now)
  s.r_tat = s.r_tat + (requests - 1) / rate('r', max_r, now)
  if requests == 0 then
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZREM', KEYS[2], id)
  else
    -- Answered: the server counted it on arrival, by now at the latest.
    redis.call('HSET', KEYS[3], id, int(tokens))
    redis.call('ZADD', KEYS[2], 'XX', int(now + window), id)
  end
  save()
  return 1
end

-- The line: requests refused for now, in order of first refusal (KEYS[5], member "id|tokens"),
-- and when each must be back (KEYS[6]); one that is not back in time (its process died) leaves.
local function prune_line()
  local late = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', int(now))
  if #late > 0 then
    each_chunk(late, function(members) redis.call('ZREM', KEYS[5], unpack(members)) end)
    redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', int(now))
  end
end

-- When the request of `tokens` at `rank` in line will be due: its own time plus the pace of
-- those ahead, and not before the log has room for them and for it.
local function due_at(at, rank, tokens)
  if rank == 0 then return at end
  local t_rate, r_rate = rate('t', max_t, now), rate('r', max_r, now)
  local ahead = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[5], 0, rank - 1)) do
    -- Each is charged its tokens times the count factor, as the asker is.
    local cost = (tonumber(string.match(member, '|(%d+)$')) or 0) * s.over
    ahead = ahead + cost
    at = at + math.max(cost / t_rate, 1 / r_rate)
  end
  return math.max(at, log_ready(ahead + tokens, rank + 1))
end

if op == 'acquire' then
  local id, asked, worker, grace = ARGV[A], tonumber(ARGV[A + 1]), ARGV[A + 2], tonumber(ARGV[A + 3])
  local member = id .. '|' .. ARGV[A + 1]
  local tokens = math.min(math.ceil(asked * s.over - 1e-9), math.max(asked, log_t))
  redis.call('ZADD', KEYS[4], int(now), worker)
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', int(now - window))
  local workers = redis.call('ZCARD', KEYS[4])
  local factors = {int(factor('t', now) * 1e6), int(factor('r', now) * 1e6)}
  local booked = redis.call('ZSCORE', KEYS[2], id)
  if booked then  -- asked again after a lost answer: the same booking
    local at = tonumber(booked) - unanswered
    local charged = math.abs(tonumber(redis.call('HGET', KEYS[3], id)) or tokens)
    return {1, int(math.max(0, at - now)), workers, factors[1], factors[2], int(charged)}
  end
  prune_line()
  local rank = redis.call('ZRANK', KEYS[5], member)
  if not rank and redis.call('ZCARD', KEYS[5]) > 0 then  -- others are waiting: behind them
    redis.call('ZADD', KEYS[5], int(now), member)
    rank = redis.call('ZRANK', KEYS[5], member)
  end
  local at = math.max(now, s.hold, s.t_tat - burst, s.r_tat - burst, log_ready(tokens, 1))
  if (not rank or rank == 0) and at <= now + lead then
    redis.call('ZREM', KEYS[5], member)
    redis.call('ZREM', KEYS[6], member)
    redis.call('ZADD', KEYS[2], int(at + unanswered), id)
    redis.call('HSET', KEYS[3], id, int(-tokens))
    s.tokens = s.tokens + tokens
    s.pending = s.pending + tokens
    s.requests = s.requests + 1
    charge('t', tokens, max_t, at)
    charge('r', 1, max_r, at)
    save()
    return {1, int(at - now), workers, factors[1], factors[2], int(tokens)}
  end
  if not rank then
    redis.call('ZADD', KEYS[5], int(now), member)
    rank = 0
  end
  local back = math.max(now, due_at(at, rank, tokens) - lead)
  redis.call('ZADD', KEYS[6], int(back + grace), member)
  save()
  return {0, int(back - now), workers, factors[1], factors[2], int(tokens)}
elseif op == 'settle' then
  local used, asked = tonumber(ARGV[A + 1]), tonumber(ARGV[A + 2])
  local live = recharge(ARGV[A], used, 1)
  if live == 1 and asked >= COUNT_MIN then
    redis.call('LPUSH', KEYS[7], real(used / asked))
    redis.call('LTRIM', KEYS[7], 0, COUNTS - 1)
    local over = 1
    for _, ratio in ipairs(redis.call('LRANGE', KEYS[7], 0, -1)) do
      over = math.max(over, tonumber(ratio))
    end
    s.over = math.min(COUNT_MAX, over)
    save()
  end
  return {live}
elseif op == 'refund' then  -- also leaves the line (a caller cancelled while waiting)
  local member = ARGV[A] .. '|' .. ARGV[A + 1]
  redis.call('ZREM', KEYS[5], member)
  redis.call('ZREM', KEYS[6], member)
  return {recharge(ARGV[A], 0, 0)}
elseif op == 'carry' then
  if fresh then s.restored_at = now end
  redis.call('ZADD', KEYS[4], int(now), ARGV[A])
  local added = 0
  for i = A + 1, #ARGV - 2, 3 do
    local id, tokens, left = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    local charged = tonumber(redis.call('HGET', KEYS[3], id))
    if charged then
      if charged < 0 then  -- the worker's count (settled, or as charged) is taken as known
        charged = -charged
        s.pending = s.pending - charged
      end
      s.tokens = s.tokens + tokens - charged
      redis.call('HSET', KEYS[3], id, int(tokens))
    elseif left > 0 then
      redis.call('HSET', KEYS[3], id, int(tokens))
      redis.call('ZADD', KEYS[2], int(now + math.min(left, unanswered)), id)
      s.tokens = s.tokens + tokens
      s.requests = s.requests + 1
      added = added + 1
    end
  end
  save()
  return {added, int(math.max(0, s.restored_at + window - now))}
elseif op == 'cut' then
  local kind, retry_after = ARGV[A], tonumber(ARGV[A + 1])
  -- A 429 alone (none within a window before it) costs no cut: workers that keep to the log meet
  -- the server's limit only at a window's edge, by a latency or a count that differs a little,
  -- and the refused request's charge, kept, already slows the pace by its size. A second within
  -- a window (from any worker) means the quota is spent elsewhere too: then the cut.
  local alone = now - s.limited_at >= window
  s.limited_at = now
  for _, k in ipairs({'t', 'r'}) do
    if not alone and (kind == '' or kind == k .. 'pm')
        and now - s[k .. '_cut_at'] >= CUT_SPACING * window then
      s[k .. '_cut'] = math.max(FLOOR, factor(k, now) * CUT)
      s[k .. '_cut_at'] = now
      -- Credit banked while idle would let a burst through right after the server said no.
      s[k .. '_tat'] = math.max(s[k .. '_tat'], now)
    end
  end
  if retry_after > 0 then s.hold = math.max(s.hold, now + retry_after) end
  save()
  return {1}
end
return redis.error_reply('unknown operation ' .. tostring(op))
