"""The Lua scripts of ``store.py``: each is one atomic round trip.

Keys are passed in KEYS (never built inside a script), so the layout stays cluster-compatible.
"""

from __future__ import annotations

# The per-room lock (issue 11, CONTRACT.md "Rooms and members": one generation at a time per
# room, in acceptance order). Per room: ``lock`` is "<fencing token> <ticket>" with a TTL the
# holder refreshes; ``queue`` lists the waiting tickets in acceptance order and ``waiting`` holds
# each one's deadline (ms, refreshed by its owner): a waiter at the head whose deadline passed
# belongs to a replica that died and is dropped. A ticket is "{userId}/{requestId}/{attempt}".
# The token comes from a per-room counter, so a holder whose lock lapsed (and was taken over)
# can never write the room's history again: FINISH compares it with the lock's value.
ROOM_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reap(q, w, now)
  while true do
    local head = redis.call('LINDEX', q, 0)
    if not head then return end
    if tonumber(redis.call('HGET', w, head) or '0') >= now then return end
    redis.call('LPOP', q)
    redis.call('HDEL', w, head)
  end
end
local function take(lock, fence, ticket, ttl, keep_s)
  local value = redis.call('INCR', fence) .. ' ' .. ticket
  redis.call('EXPIRE', fence, keep_s)
  redis.call('SET', lock, value, 'PX', ttl)
  return value
end
local function load(meta, hist, char, n, cap, user_message, hist_ttl)
  local history = {}
  if n > 0 then history = redis.call('LRANGE', hist, -n, -1) end
  if redis.call('HGET', meta, 'userStored') ~= '1' then
    local message = cjson.decode(user_message)
    local id = redis.call('HGET', meta, 'userMessageId')
    if id and message['id'] ~= id then  -- a retried record keeps its first attempt's ids
      message['id'] = id
      message['createdAt'] = redis.call('HGET', meta, 'createdAt')
      user_message = cjson.encode(message)
    end
    redis.call('RPUSH', hist, user_message)
    redis.call('LTRIM', hist, -cap, -1)
    redis.call('EXPIRE', hist, hist_ttl)
    redis.call('HSET', meta, 'userStored', '1')
  end
  return history, redis.call('HGET', char, 'systemPrompt') or ''
end
local function release(lock, q, w, token, ticket, channel, room)
  if token ~= '' then
    if redis.call('GET', lock) == token then
      redis.call('DEL', lock)
      if redis.call('LLEN', q) > 0 then redis.call('PUBLISH', channel, room) end
    end
    return
  end
  local pos = redis.call('LPOS', q, ticket)
  if pos then
    redis.call('LREM', q, 1, ticket)
    redis.call('HDEL', w, ticket)
    if pos == 0 and redis.call('LLEN', q) > 0 then redis.call('PUBLISH', channel, room) end
  end
end
"""

# Before the model is called: claim the key; when this request runs the generation, either take
# the room's lock at once (free room: load the history and the character prompt, store the user
# message, all in this one round trip) or join the room's queue (``TURN`` takes the lock later).
# A full queue refuses (``busy``) before anything is written.
# A record is run again (same ids, attempt + 1, user message kept) when its last attempt failed
# with a retryable code, or when it is "running" but its owner's lease has lapsed (that replica
# died): a retry must not attach to a generation nobody runs. A "queued" record (a batch task's,
# made at acceptance with its user message stored: tasks.py) runs as ``new`` the same way.
# KEYS: meta, request index, room history, character, lease, room lock, queue, waiting, fence.
# ARGV: ttl, userId, history N, history cap, user message JSON, lease ms, history ttl,
# queue max, lock ttl ms, ticket prefix "{userId}/{requestId}", then the new record's
# field/value pairs. Returns {outcome, meta, history, prompt, queue position, lock token}.
CLAIM = (
    ROOM_LIB
    + """
local state = redis.call('HGET', KEYS[1], 'state')
local outcome
if state and not ((state == 'failed' and redis.call('HGET', KEYS[1], 'retryable') == '1')
    or (state == 'running' and redis.call('EXISTS', KEYS[5]) == 0) or state == 'queued') then
  return {'existing', redis.call('HGETALL', KEYS[1]), {}, '', 0, ''}
end
local now = now_ms()
reap(KEYS[7], KEYS[8], now)
local held = redis.call('EXISTS', KEYS[6]) == 1
local waiting = redis.call('LLEN', KEYS[7])
if (held or waiting > 0) and waiting >= tonumber(ARGV[8]) then
  return {'busy', {}, {}, '', waiting, ''}
end
if not state then
  redis.call('HSET', KEYS[1], unpack(ARGV, 11))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  outcome = 'new'
else
  redis.call('HINCRBY', KEYS[1], 'attempt', 1)
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HDEL', KEYS[1], 'error', 'retryable', 'retryAfter', 'cancel')
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  outcome = state == 'queued' and 'new' or 'retry'
end
redis.call('SET', KEYS[5], '1', 'PX', ARGV[6])
local ticket = ARGV[10] .. '/' .. redis.call('HGET', KEYS[1], 'attempt')
local ttl = tonumber(ARGV[9])
if not held and waiting == 0 then
  local token = take(KEYS[6], KEYS[9], ticket, ttl, ARGV[7])
  local history, prompt = load(KEYS[1], KEYS[3], KEYS[4], tonumber(ARGV[3]), tonumber(ARGV[4]),
                               ARGV[5], ARGV[7])
  return {outcome, redis.call('HGETALL', KEYS[1]), history, prompt, 0, token}
end
redis.call('RPUSH', KEYS[7], ticket)
redis.call('HSET', KEYS[8], ticket, now + ttl)
redis.call('PEXPIRE', KEYS[7], ARGV[1] * 1000)
redis.call('PEXPIRE', KEYS[8], ARGV[1] * 1000)
return {outcome, redis.call('HGETALL', KEYS[1]), {}, '', redis.call('LLEN', KEYS[7]), ''}
"""
)

# A waiting generation asks for its turn: the lock when it is at the head of the queue and the
# room is free (then, as in CLAIM, history and prompt loaded and the user message stored), else
# its position (1 + the waiters ahead) and the lock's PTTL, refreshing its own deadline.
# KEYS: meta, room history, character, room lock, queue, waiting, fence.
# ARGV: ticket, lock ttl ms, history N, history cap, user message JSON, history ttl.
# Returns {0, token, history, prompt} | {position, pttl} | {-1} (no longer queued).
TURN = (
    ROOM_LIB
    + """
local now = now_ms()
reap(KEYS[5], KEYS[6], now)
local pos = redis.call('LPOS', KEYS[5], ARGV[1])
if not pos then return {-1} end
local ttl = tonumber(ARGV[2])
if pos > 0 or redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[6], ARGV[1], now + ttl)
  return {pos + 1, redis.call('PTTL', KEYS[4])}
end
redis.call('LPOP', KEYS[5])
redis.call('HDEL', KEYS[6], ARGV[1])
local token = take(KEYS[4], KEYS[7], ARGV[1], ttl, ARGV[6])
local history, prompt = load(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4]),
                             ARGV[5], ARGV[6])
return {0, token, history, prompt}
"""
)

# The heartbeat of one generation's place in its room: the holder's lock (only while it is still
# its own) or the waiter's deadline (only while it is still queued).
# KEYS: room lock, queue, waiting. ARGV: token ('' for a waiter), ticket, ttl ms.
KEEP = (
    ROOM_LIB
    + """
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
  return
end
if redis.call('LPOS', KEYS[2], ARGV[2]) then
  redis.call('HSET', KEYS[3], ARGV[2], now_ms() + tonumber(ARGV[3]))
end
"""
)

# The end of an attempt, only if it is still the current one (a replica whose lease lapsed
# must not overwrite its successor): terminal entry, record updated, lease dropped, the room's
# lock released (or the ticket taken out of the queue), and for a finished generation the
# assistant message stored, only by the lock's holder: a holder whose lock lapsed and was taken
# over is refused (returns 0) and writes nothing (fencing). A superseded attempt still gives up
# its place in the room. A batch task's record (field ``task``) also keeps the assistant message.
# KEYS: meta, buffer, room history, lease, room lock, queue, waiting.
# ARGV: attempt, entry id, 'end' | 'error', data JSON, buffer ttl, record ttl, retryable,
# retry-after, assistant message JSON ('' for none), history cap, history ttl, lock token ('':
# never held), ticket, turn channel, roomId.
FINISH = (
    ROOM_LIB
    + """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then
  release(KEYS[5], KEYS[6], KEYS[7], ARGV[12], ARGV[13], ARGV[14], ARGV[15])
  return 0
end
if ARGV[9] ~= '' and (ARGV[12] == '' or redis.call('GET', KEYS[5]) ~= ARGV[12]) then
  return 0
end
if ARGV[8] ~= '' then
  redis.call('XADD', KEYS[2], ARGV[2], 't', ARGV[3], 'd', ARGV[4], 'ra', ARGV[8])
else
  redis.call('XADD', KEYS[2], ARGV[2], 't', ARGV[3], 'd', ARGV[4])
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
if ARGV[3] == 'end' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'end', ARGV[4])
  if ARGV[9] ~= '' and redis.call('HEXISTS', KEYS[1], 'task') == 1 then
    redis.call('HSET', KEYS[1], 'assistant', ARGV[9])  -- a batch task publishes it as stored
  end
else
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[4], 'retryable', ARGV[7],
             'retryAfter', ARGV[8])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
if ARGV[9] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[9])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[10]), -1)
  redis.call('EXPIRE', KEYS[3], ARGV[11])
end
redis.call('DEL', KEYS[4])
release(KEYS[5], KEYS[6], KEYS[7], ARGV[12], ARGV[13], ARGV[14], ARGV[15])
return 1
"""
)

# KEYS: meta. ARGV: channel, message.
CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  return 'cancelling'
end
return 'done'
"""

# A person-to-person message, once per (userId, requestId): the first call stores it (the
# idempotency key holds its JSON) and appends it to the room's history; a repeat returns what
# was stored. KEYS: idempotency key, room history. ARGV: message JSON, idempotency ttl, history
# cap, history ttl. Returns {1 | 0 (repeat), message JSON}.
POST = """
local stored = redis.call('GET', KEYS[1])
if stored then return {0, stored} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {1, ARGV[1]}
"""
