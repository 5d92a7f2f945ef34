"""The Lua scripts of ``store.py``: each is one atomic round trip.

Keys are passed in KEYS (never built inside a script), so the layout stays cluster-compatible.
"""

from __future__ import annotations

# Before the model is called: claim the key and, when this request runs the generation, load
# the room's history and the character prompt and store the user message, all at once.
# A record is run again (same ids, attempt + 1, user message kept) when its last attempt failed
# with a retryable code, or when it is "running" but its owner's lease has lapsed (that replica
# died): a retry must not attach to a generation nobody runs.
# KEYS: meta, request index, room history, character, lease.
# ARGV: ttl, userId, history N, history cap, user message JSON, lease ms, history ttl, then the
# new record's field/value pairs. Storing the user message refreshes the history's idle expiry.
CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
local outcome
if not state then
  redis.call('HSET', KEYS[1], unpack(ARGV, 8))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  outcome = 'new'
elseif (state == 'failed' and redis.call('HGET', KEYS[1], 'retryable') == '1')
    or (state == 'running' and redis.call('EXISTS', KEYS[5]) == 0) then
  redis.call('HINCRBY', KEYS[1], 'attempt', 1)
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HDEL', KEYS[1], 'error', 'retryable', 'retryAfter', 'cancel')
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  outcome = 'retry'
else
  return {'existing', redis.call('HGETALL', KEYS[1]), {}, ''}
end
redis.call('SET', KEYS[5], '1', 'PX', ARGV[6])
local history = {}
if tonumber(ARGV[3]) > 0 then
  history = redis.call('LRANGE', KEYS[3], -tonumber(ARGV[3]), -1)
end
if outcome == 'new' then
  redis.call('RPUSH', KEYS[3], ARGV[5])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[4]), -1)
  redis.call('EXPIRE', KEYS[3], ARGV[7])
end
local prompt = redis.call('HGET', KEYS[4], 'systemPrompt') or ''
return {outcome, redis.call('HGETALL', KEYS[1]), history, prompt}
"""

# The end of an attempt, only if it is still the current one (a replica whose lease lapsed
# must not overwrite its successor): terminal entry, record updated, lease dropped, and for a
# finished generation the assistant message stored.
# KEYS: meta, buffer, room history, lease.
# ARGV: attempt, entry id, 'end' | 'error', data JSON, buffer ttl, record ttl, retryable,
# retry-after, assistant message JSON ('' for none), history cap, history ttl.
FINISH = """
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
if ARGV[8] ~= '' then
  redis.call('XADD', KEYS[2], ARGV[2], 't', ARGV[3], 'd', ARGV[4], 'ra', ARGV[8])
else
  redis.call('XADD', KEYS[2], ARGV[2], 't', ARGV[3], 'd', ARGV[4])
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
if ARGV[3] == 'end' then
  redis.call('HSET', KEYS[1], 'state', 'done', 'end', ARGV[4])
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
return 1
"""

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
