"""Batch tasks (CONTRACT.md section 2 "Batch", issue 12): a job queue every replica works from.

``POST /chat/tasks`` stores the user message and queues a job; workers in every replica run it
through the registry (``start_or_attach``: the same idempotent generation a stream request would
get, under the room's lock); when it ends the task record holds the outcome and the outcome is
published once on ``bs:tasks:done`` (and queued for the webhook). README "Batch tasks" has the
why; in short:

- The queue is a Redis Stream (``bs:tasks``, entries ``{task: "{userId}/{taskId}"}``) with one
  consumer group (``workers``); each process is one consumer with ``TASK_WORKERS`` jobs at once.
  An entry stays in the group's pending list until its job ended; a worker that died leaves it
  there, and once it has been idle ``TASK_CLAIM_IDLE_S`` another worker takes it (XAUTOCLAIM).
  A live worker re-claims its own entry every third of that time (XCLAIM ... JUSTID resets the
  idle time) so a long job is never taken from it. The end is one script: record, the once-only
  guard (``SET NX``), PUBLISH, the webhook's queue, XACK and the trim (``MINID`` below the oldest
  entry not yet acknowledged: nothing unprocessed is ever trimmed away; acceptance refuses once
  ``TASK_QUEUE_MAX`` entries wait: the group's ``lag`` + ``pending``, not the stream's length,
  which still counts acknowledged entries the approximate trim left).
- A job is idempotent by ``(userId, taskId)``: the generation's record ``bs:gen:{u}/{t}`` is
  made at acceptance in the state ``queued`` with the task's ids and ``userStored`` (CLAIM runs
  a queued record as new and never stores its user message again), so a job run again after a
  worker's death attaches to the running generation, re-runs one whose replica died, or takes
  the stored result of one that ended: one user message, at most one assistant message.
- ``attempts`` (in the task record) counts the generations this task's jobs started, taken in
  Redis before each start (``ATTEMPT``: under the cap, or not at all; given back when the job
  attached instead), so workers that took one task over from each other never start more than
  ``TASK_MAX_ATTEMPTS``; at the cap the task is ``failed`` with the last code.
  ``TASK_TIMEOUT_S`` runs from the job's first start (``startedAtMs``, kept across workers):
  past it, ``failed`` ``MODEL_TIMEOUT``. A job only starts (``BEGIN``: ``running``) a task that
  has not ended: a worker that took a stalled job over never turns a ``done`` back.

Keys (every one expires or is bounded):
- ``bs:task:{userId}/{taskId}``  hash, ``TASK_TTL_S``: ``state`` (queued | running | done |
  failed), ``roomId``, ``userMessage`` (JSON), ``messageId``, ``attempts``, ``createdAtMs``,
  ``startedAtMs``, ``lastCode``; at the end ``content``, ``finishReason``, ``usage`` (JSON) or
  ``code`` / ``error``, ``endedAtMs``.
- ``bs:task:{userId}/{taskId}:published``  the once-only guard of the outcome (``TASK_TTL_S``).
- ``bs:tasks``  the stream; ``bs:tasks:webhooks``  sorted set slug -> due time (ms) of the
  webhook deliveries; ``bs:task:{userId}/{taskId}:webhook``  hash ``body``, ``attempts``.
- channel ``bs:tasks:done``: ``TaskOutcome`` JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import random
import socket
import time
import uuid
from contextlib import aclosing
from typing import Any, cast

import httpx
import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from backend_stream.errors import ModelTimeout, RequestRejected
from backend_stream.generation import Event
from backend_stream.listeners import EventFeed, is_ping
from backend_stream.logs import bind_request
from backend_stream.metrics import Metrics
from backend_stream.registry import Attachment, GenerationRegistry, _new_record, _user_message
from backend_stream.settings import Settings, TaskSettings
from backend_stream.store import GenerationStore, GenKey, GenState, index_key, room_key
from backend_stream.usage import UsageLedger
from contracts import (
    RETRYABLE,
    ChatMessage,
    ChatRequest,
    ErrorCode,
    Role,
    SseEvent,
    StreamEnd,
    TaskAccepted,
    TaskOutcome,
    TaskState,
    TaskStatus,
    Usage,
    utc_now_iso,
)
from contracts.aio import awaited, cancel_and_wait

log = structlog.get_logger("backend_stream.tasks")

TASK_STREAM = "bs:tasks"
TASK_GROUP = "workers"
DONE_CHANNEL = "bs:tasks:done"
WEBHOOK_QUEUE = "bs:tasks:webhooks"
SIGNATURE_HEADER = "X-Signature-SHA256"
TIMESTAMP_HEADER = "X-Signature-Timestamp"

READ_BLOCK_MS = 1000  # a worker's XREADGROUP wait (then it looks for stale entries again)
RECLAIM_SCAN_CALLS = 10  # XAUTOCLAIM calls per look (each scans up to 10 pending entries)
CONSUMER_GC_S = 60.0  # how often a replica drops the group's consumers that left
CONSUMER_GC_IDLE_MS = 3_600_000  # ... idle this long with nothing pending
LOOP_BACKOFF_MIN_S = 0.1
LOOP_BACKOFF_MAX_S = 5.0
RETRY_BACKOFF_S = 0.5  # between attempts of a job: 0.5 s, 1 s, 2 s ... (or the Retry-After)
RETRY_BACKOFF_MAX_S = 10.0
QUEUE_FULL_RETRY_S = 5.0
SHUTDOWN_TIMEOUT_S = 2.0
WEBHOOK_CONCURRENCY = 4  # deliveries at once per replica
WEBHOOK_POLL_S = 1.0  # a deliverer looks for due deliveries at least this often
WEBHOOK_BACKOFF_S = 1.0  # before the 2nd attempt; doubling, at most WEBHOOK_BACKOFF_MAX_S
WEBHOOK_BACKOFF_MAX_S = 60.0
FINISHED = (TaskState.DONE.value, TaskState.FAILED.value)

# Pieces shared by the scripts below.
_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ours(stream, group, id, consumer)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p > 0 and p[1][2] == consumer
end
-- XACK, then trim below the oldest entry not yet acknowledged (the pending list's first, else
-- the group's last delivered: everything before it is acknowledged, everything after it waits).
local function ack(stream, group, id)
  if id ~= '' then redis.call('XACK', stream, group, id) end
  local floor = redis.call('XPENDING', stream, group)[2]
  if not floor then
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
      local name, last
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then
          last = g[i + 1]
        end
      end
      if name == group then floor = last end
    end
  end
  if floor then redis.call('XTRIM', stream, 'MINID', '~', floor) end
end
"""

# Acceptance. KEYS: task, generation record, request index, room history, stream.
# ARGV: task ttl, record ttl, userId, history cap, history ttl, user message JSON, queue max,
# slug, roomId, group, then the generation record's field/value pairs (state "queued").
# Returns {'existing' | 'new' | 'full' | 'room', task record flat}. When the requestId is
# already a message request's (stream / complete) in the same room, the task follows that
# generation and its user message (stored by that request: never twice); in another room it is
# refused ('room', nothing written): its answer would go to the other room.
ACCEPT = (
    _LIB
    + """
-- entries that really wait: not yet delivered to the group (lag) or delivered and not yet
-- acknowledged (pending). XLEN would also count the acknowledged ones the approximate trim
-- (MINID ~, whole nodes) leaves. Unknown lag, or no group yet: every entry counts.
local function waiting(stream, group)
  if redis.call('EXISTS', stream) == 0 then return 0 end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, pending, lag
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1]
      elseif g[i] == 'pending' then pending = g[i + 1]
      elseif g[i] == 'lag' then lag = g[i + 1] end
    end
    if name == group then
      if type(lag) ~= 'number' then return redis.call('XLEN', stream) end
      return pending + lag
    end
  end
  return redis.call('XLEN', stream)
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'existing', redis.call('HGETALL', KEYS[1])} end
local follows = redis.call('EXISTS', KEYS[2]) == 1
if follows and redis.call('HGET', KEYS[2], 'roomId') ~= ARGV[9] then return {'room', {}} end
if waiting(KEYS[5], ARGV[10]) >= tonumber(ARGV[7]) then return {'full', {}} end
local user_message = ARGV[6]
if follows then
  local ids = redis.call('HMGET', KEYS[2], 'userMessageId', 'createdAt')
  local message = cjson.decode(user_message)
  message['id'] = ids[1]
  message['createdAt'] = ids[2]
  user_message = cjson.encode(message)
else
  redis.call('HSET', KEYS[2], unpack(ARGV, 11))
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('SADD', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  redis.call('RPUSH', KEYS[4], user_message)
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[4]), -1)
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'roomId', ARGV[9], 'userMessage', user_message,
           'messageId', redis.call('HGET', KEYS[2], 'messageId'), 'attempts', 0,
           'createdAtMs', now_ms())
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'task', ARGV[8])
return {'new', redis.call('HGETALL', KEYS[1])}
"""
)

# The end of a job. KEYS: task, published guard, stream, webhook queue, webhook body.
# ARGV: group, entry id ('' none), outcome JSON, channel, ttl, webhook ('1' / '0'), slug, then
# the task record's field/value pairs. Only the first end of a task writes and publishes.
END = (
    _LIB
    + """
local first = redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[5])
if first then
  redis.call('HSET', KEYS[1], unpack(ARGV, 8))
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('PUBLISH', ARGV[4], ARGV[3])
  if ARGV[6] == '1' then
    redis.call('HSET', KEYS[5], 'body', ARGV[3], 'attempts', 0)
    redis.call('EXPIRE', KEYS[5], ARGV[5])
    redis.call('ZADD', KEYS[4], now_ms(), ARGV[7])
    redis.call('EXPIRE', KEYS[4], ARGV[5])  -- gone, too, once no replica delivers any more
  end
end
ack(KEYS[3], ARGV[1], ARGV[2])
return first and 1 or 0
"""
)

# A job starts (or, taken over, starts again): ``running`` and the first start's time, unless
# the task ended meanwhile (another worker that still had it wrote ``done`` / ``failed``: that
# end stays). KEYS: task. ARGV: now ms. Returns ``startedAtMs``, or false (ended, or gone).
BEGIN = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'done' or state == 'failed' then return false end
redis.call('HSETNX', KEYS[1], 'startedAtMs', ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'running')
return redis.call('HGET', KEYS[1], 'startedAtMs')
"""

# Before a job starts a generation: one attempt taken under the cap. KEYS: task. ARGV: max
# attempts, delta ('1' take, '-1' give back one taken that started nothing). Returns the
# attempts now, 0 at the cap (nothing taken), -1 when the task ended or is gone.
ATTEMPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if ARGV[2] == '-1' then return redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
if state == 'done' or state == 'failed' then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') >= tonumber(ARGV[1]) then
  return 0
end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""

# A live job keeps its entry fresh, only while the entry is still this consumer's.
# KEYS: stream. ARGV: group, entry id, consumer. Returns 1, or 0 when another worker has it.
KEEP = (
    _LIB
    + """
if not ours(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""
)

# A worker shutting down hands its job to the others at once: the same task queued again, its
# entry acknowledged. KEYS: stream. ARGV: group, entry id, consumer, slug.
RELEASE = (
    _LIB
    + """
if not ours(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XADD', KEYS[1], '*', 'task', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
)

# The group's consumers that left (a process that stopped) with nothing pending.
# KEYS: stream. ARGV: group, idle ms.
FORGET_CONSUMERS = """
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name, pending, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1]
    elseif c[i] == 'pending' then pending = c[i + 1]
    elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if pending == 0 and idle > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    n = n + 1
  end
end
return n
"""

# A deliverer takes the first due webhook delivery, leased for ARGV[1] ms (a deliverer that
# died leaves it due again then). KEYS: webhook queue. Returns its slug or false.
WEBHOOK_TAKE = (
    _LIB
    + """
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), due[1])
return due[1]
"""
)

# A failed delivery is due again in ARGV[2] ms (unless it is gone). KEYS: webhook queue.
WEBHOOK_LATER = (
    _LIB
    + """
return redis.call('ZADD', KEYS[1], 'XX', now_ms() + tonumber(ARGV[2]), ARGV[1])
"""
)


def task_key(key: GenKey) -> str:
    return f"bs:task:{key.slug}"


def published_key(key: GenKey) -> str:
    return f"bs:task:{key.slug}:published"


def webhook_key(slug: str) -> str:
    return f"bs:task:{slug}:webhook"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Signature-SHA256`` header: hex HMAC-SHA256 of ``"{timestamp}.{raw body}"``, the
    timestamp (unix seconds) being the ``X-Signature-Timestamp`` header: a receiver refuses an
    old one, so a captured delivery cannot be replayed later (README "Batch tasks")."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def consumer_name() -> str:
    """This process in the consumer group: host, pid and a random part (a restarted pod with
    the same pid is another consumer)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _flat(pairs: list[Any]) -> dict[str, str]:
    return dict(zip(pairs[::2], pairs[1::2], strict=True))


def _request(record: dict[str, str]) -> ChatRequest:
    message = ChatMessage.model_validate_json(record["userMessage"])
    assert message.user_id is not None
    return ChatRequest(
        request_id=message.request_id,
        room_id=record["roomId"],
        user_id=message.user_id,
        content=message.content,
        character_id=message.character_id,
    )


def task_status(task_id: str, record: dict[str, str]) -> TaskStatus:
    """A task record as ``GET /chat/tasks/{taskId}`` answers it."""
    state = TaskState(record.get("state", TaskState.QUEUED))
    done = state is TaskState.DONE
    usage = record.get("usage")
    code = record.get("code")
    return TaskStatus(
        task_id=task_id,
        status=state,
        room_id=record["roomId"],
        message_id=record.get("messageId") if done else None,
        content=record.get("content") if done else None,
        finish_reason=(record.get("finishReason") or None) if done else None,
        usage=Usage.model_validate_json(usage) if usage and done else None,
        code=ErrorCode(code) if code and state is TaskState.FAILED else None,
    )


class TaskQueue:
    """Accepts tasks, runs this replica's workers, reads task records (module docstring)."""

    def __init__(
        self,
        *,
        redis: Redis,
        store: GenerationStore,
        registry: GenerationRegistry,
        feed: EventFeed,
        settings: Settings,
        metrics: Metrics,
        ledger: UsageLedger | None = None,
    ) -> None:
        self._ledger = ledger
        self._redis = redis
        self._store = store
        self._registry = registry
        self._feed = feed
        self._settings = settings
        self._s: TaskSettings = settings.tasks
        self._metrics = metrics
        self.consumer = consumer_name()
        self._accept = redis.register_script(ACCEPT)
        self._end = redis.register_script(END)
        self._keep = redis.register_script(KEEP)
        self._begin = redis.register_script(BEGIN)
        self._attempt = redis.register_script(ATTEMPT)
        self._release = redis.register_script(RELEASE)
        self._forget = redis.register_script(FORGET_CONSUMERS)
        # well inside the socket timeout, so a quiet queue never reads as a Redis failure
        self._block_ms = max(10, min(READ_BLOCK_MS, int(settings.redis_timeout_s * 500)))
        self._group_ready = False
        self._next_reclaim = 0.0
        self._next_gc = 0.0
        self._workers: list[asyncio.Task[None]] = []
        self.webhooks: WebhookDeliverer | None = None
        if self._s.webhook_url:
            self.webhooks = WebhookDeliverer(redis, self._s, metrics)

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work_forever(), name=f"task-worker-{i}")
            for i in range(self._s.workers)
        ]
        if self.webhooks is not None:
            self.webhooks.start()

    async def aclose(self) -> None:
        """Stop the workers: a job in progress is handed to the other replicas at once."""
        left = await cancel_and_wait(self._workers, SHUTDOWN_TIMEOUT_S)
        if left:
            log.warning("task_workers_left_running_at_shutdown", count=len(left))
        if self.webhooks is not None:
            await self.webhooks.aclose()

    # ---- acceptance and status ------------------------------------------------------------

    async def admit(self, req: ChatRequest) -> bool:
        """The one place a new task is admitted, before anything is stored: the budgets
        (backend_stream/usage.py) reserve its maximum (``BATCH_MAX_TOKENS``) now, so a spent user
        is refused at once with 429 ``BUDGET_EXCEEDED``; the job's run finds the reservation and
        settles it. Not called for a task that exists already (the same taskId again answers its
        status). True when this call made the reservation."""
        if self._ledger is None:
            return False
        return await self._ledger.reserve(req.user_id, req.request_id, self._s.batch_max_tokens)

    async def accept(self, req: ChatRequest) -> TaskAccepted:
        """Store the user message and queue the job, once per ``(userId, taskId)``; the same
        task again answers its current state (no second message, no second job)."""
        key = GenKey(req.user_id, req.request_id)
        existing = cast(dict[str, str], await awaited(self._redis.hgetall(task_key(key))))
        if existing:
            return _accepted(req.request_id, existing)
        reserved = await self.admit(req)
        record = {
            **_new_record(req),
            "state": GenState.QUEUED.value,
            "attempt": "0",
            "userStored": "1",  # stored here, at acceptance: CLAIM never stores it again
            "task": "1",
            "maxOutputTokens": str(self._s.batch_max_tokens),
        }
        message = _user_message(req, record)
        s = self._settings
        res = await self._accept(
            keys=[
                task_key(key), key.meta, index_key(req.request_id), room_key(req.room_id),
                TASK_STREAM,
            ],
            args=[
                self._s.ttl_s, s.idempotency_ttl_s, req.user_id, s.history_cap, s.history_ttl_s,
                orjson.dumps(message.wire()), self._s.queue_max, key.slug, req.room_id,
                TASK_GROUP, *[x for pair in record.items() for x in pair],
            ],
        )  # fmt: skip
        outcome, flat = res
        # The reservation (bs:resv:{userId}:{requestId}) is one per (user, request), whoever
        # made it, and the generation of that pair settles it when it ends. So it is released
        # here only when this call made it (admit True) and this task makes no generation of
        # that pair run: 'full' and 'room' (nothing stored, no job), 'existing' when that task
        # has ended. An 'existing' task still queued or running keeps it: its job's generation
        # (running, or to come) settles that very key; released, it would run unreserved and
        # its usage would go uncounted. 'new' keeps it for its own job.
        ended = outcome == "existing" and _flat(flat).get("state") in FINISHED
        if reserved and self._ledger is not None and (outcome in ("full", "room") or ended):
            await self._ledger.release(req.user_id, req.request_id)
        if outcome == "room":
            raise RequestRejected(
                ErrorCode.INVALID_PAYLOAD,
                "requestId is already a message request of this user in another room",
            )
        if outcome == "full":
            raise RequestRejected(
                ErrorCode.BACKEND_UNAVAILABLE,
                "the task queue is full; try again later",
                retry_after_s=QUEUE_FULL_RETRY_S,
            )
        if outcome == "new":
            log.info("task_accepted", taskId=req.request_id)
        return _accepted(req.request_id, _flat(flat))

    async def status(self, user_id: str, task_id: str) -> TaskStatus | None:
        key = GenKey(user_id, task_id)
        record = cast(dict[str, str], await awaited(self._redis.hgetall(task_key(key))))
        return task_status(task_id, record) if record else None

    # ---- the workers ----------------------------------------------------------------------

    async def _work_forever(self) -> None:
        backoff_s = LOOP_BACKOFF_MIN_S
        while True:
            try:
                entry = await self._next_entry()
                backoff_s = LOOP_BACKOFF_MIN_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # loop edge: Redis away, the group gone; back off
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    self._group_ready = False
                log.warning("task_worker_error", error=type(exc).__name__)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, LOOP_BACKOFF_MAX_S)
                continue
            if entry is not None:
                await self._process(*entry)

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # from "0": entries queued before the group existed (or after Redis lost it) run too
            await self._redis.xgroup_create(TASK_STREAM, TASK_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _next_entry(self) -> tuple[str, str, bool] | None:
        """A stale entry another worker left (first), else a new one; None after a quiet wait."""
        await self._ensure_group()
        now = time.monotonic()
        if now >= self._next_gc:
            self._next_gc = now + CONSUMER_GC_S
            await self._forget(keys=[TASK_STREAM], args=[TASK_GROUP, CONSUMER_GC_IDLE_MS])
        if now >= self._next_reclaim:
            found = await self._reclaim_one()
            if found is not None:
                return found
            self._next_reclaim = time.monotonic() + max(0.2, self._s.claim_idle_s / 4)
        res: Any = await self._redis.xreadgroup(
            TASK_GROUP, self.consumer, {TASK_STREAM: ">"}, count=1, block=self._block_ms
        )
        for _stream, entries in res or []:
            for entry_id, fields in entries:
                return str(entry_id), str(fields.get("task", "")), False
        return None

    async def _reclaim_one(self) -> tuple[str, str, bool] | None:
        min_idle_ms = int(self._s.claim_idle_s * 1000)
        cursor = "0-0"
        for _ in range(RECLAIM_SCAN_CALLS):
            res: Any = await self._redis.xautoclaim(
                TASK_STREAM, TASK_GROUP, self.consumer, min_idle_ms, start_id=cursor, count=1
            )
            cursor, claimed = str(res[0]), res[1]
            for entry_id, fields in claimed:
                log.info("task_taken_over", entry=entry_id)
                return str(entry_id), str((fields or {}).get("task", "")), True
            if cursor == "0-0":
                return None
        return None

    async def _process(self, entry_id: str, slug: str, taken_over: bool) -> None:
        """Run one job; never raises but CancelledError. A job whose storage failed stays
        pending (taken over once idle); one that crashed, or keeps coming back without an end
        (``TASK_MAX_ATTEMPTS`` + 3 deliveries), is failed ``INTERNAL``."""
        key = GenKey.from_slug(slug)
        keeper: asyncio.Task[None] | None = None
        try:
            if key is None:
                await self._ack(entry_id)
                return
            if taken_over and await self._deliveries(entry_id) > self._s.max_attempts + 3:
                await self._crashed(entry_id, key, "the job keeps failing before its end")
                return
            keeper = asyncio.create_task(self._keep_fresh(entry_id))
            await self._run(entry_id, key)
        except asyncio.CancelledError:
            if key is not None:  # shutting down: the job goes to another worker at once
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(SHUTDOWN_TIMEOUT_S / 2):
                        await self._release(
                            keys=[TASK_STREAM], args=[TASK_GROUP, entry_id, self.consumer, slug]
                        )
            raise
        except (RedisError, OSError) as exc:
            log.warning("task_job_storage_error", entry=entry_id, error=type(exc).__name__)
        except Exception as exc:
            log.exception("task_job_crashed", entry=entry_id, error=type(exc).__name__)
            if key is not None:
                with contextlib.suppress(Exception):
                    await self._crashed(entry_id, key, "internal error")
        finally:
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper

    async def _deliveries(self, entry_id: str) -> int:
        found: Any = await self._redis.xpending_range(
            TASK_STREAM, TASK_GROUP, entry_id, entry_id, 1
        )
        return int(found[0]["times_delivered"]) if found else 0

    async def _crashed(self, entry_id: str, key: GenKey, message: str) -> None:
        record = cast(dict[str, str], await awaited(self._redis.hgetall(task_key(key))))
        if record.get("roomId") and record.get("state") not in FINISHED:
            await self._fail(entry_id, key, record, ErrorCode.INTERNAL, message)
        else:
            await self._ack(entry_id)

    async def _keep_fresh(self, entry_id: str) -> None:
        interval_s = self._s.claim_idle_s / 3
        while True:
            await asyncio.sleep(interval_s)
            try:
                ours = await self._keep(
                    keys=[TASK_STREAM], args=[TASK_GROUP, entry_id, self.consumer]
                )
            except (RedisError, OSError) as exc:
                log.warning("task_keep_failed", error=type(exc).__name__)
                continue
            if not ours:
                log.warning("task_entry_taken_over", entry=entry_id)
                return

    async def _ack(self, entry_id: str) -> None:
        await self._redis.xack(TASK_STREAM, TASK_GROUP, entry_id)

    async def _run(self, entry_id: str, key: GenKey) -> None:
        tkey = task_key(key)
        record = cast(dict[str, str], await awaited(self._redis.hgetall(tkey)))
        if not record or record.get("state") in FINISHED:
            await self._ack(entry_id)  # expired, or ended (the end acknowledges it)
            return
        req = _request(record)
        bind_request(
            path="task", request_id=req.request_id, room_id=req.room_id, user_id=req.user_id,
            character_id=req.character_id,
        )  # fmt: skip
        now_ms = int(time.time() * 1000)
        started = await self._begin(keys=[tkey], args=[now_ms])
        if started is None:  # another worker that still had the job ended it since we read it
            await self._ack(entry_id)
            return
        deadline = time.monotonic() + (int(started) + self._s.timeout_s * 1000 - now_ms) / 1000
        attempts = int(record.get("attempts") or 0)
        last_code = record.get("lastCode") or ErrorCode.BACKEND_FAILED.value
        log.info("task_started", taskId=key.request_id, attempts=attempts)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._fail(entry_id, key, record, ErrorCode.MODEL_TIMEOUT, "task timed out")
                return
            starts = await self._would_start(key)
            if starts is None:
                await self._fail(
                    entry_id, key, record, ErrorCode.BACKEND_FAILED,
                    "the task's generation record expired before it ran",
                )  # fmt: skip
                return
            if starts:  # the attempt is taken in Redis first: other workers' count too
                taken = int(await self._attempt(keys=[tkey], args=[self._s.max_attempts, 1]))
                if taken < 0:  # ended by another worker meanwhile
                    await self._ack(entry_id)
                    return
                if taken == 0:
                    await self._fail(
                        entry_id, key, record, ErrorCode(last_code),
                        f"gave up after {self._s.max_attempts} attempts",
                    )  # fmt: skip
                    return
                attempts = taken
            try:
                att = await self._registry.start_or_attach(
                    req, time.monotonic(), max_output_tokens=self._s.batch_max_tokens
                )
            except RequestRejected as exc:
                if starts:  # nothing started
                    await self._attempt(keys=[tkey], args=[self._s.max_attempts, -1])
                if exc.code is ErrorCode.ROOM_BUSY:  # the room's queue is full: wait, no attempt
                    await asyncio.sleep(min(exc.retry_after_s or 1.0, max(remaining, 0.0)))
                    continue
                await self._fail(entry_id, key, record, exc.code, exc.message)
                return
            if starts and att.attached:  # it attached after all (free): the attempt goes back
                attempts = int(await self._attempt(keys=[tkey], args=[self._s.max_attempts, -1]))
            elif not starts and not att.attached:  # it started after all (it became re-runnable)
                attempts = int(await awaited(self._redis.hincrby(tkey, "attempts", 1)))
            event = await self._terminal(att, remaining)
            if event is None:
                if att.local is not None:
                    att.local.request_stop(
                        ModelTimeout(f"task exceeded TASK_TIMEOUT_S ({self._s.timeout_s:g}s)")
                    )
                await self._fail(entry_id, key, record, ErrorCode.MODEL_TIMEOUT, "task timed out")
                return
            if event.kind is SseEvent.END and event.payload is not None:
                await self._done(entry_id, key, record, StreamEnd.model_validate(event.payload))
                return
            data = event.payload or {}
            code = _code(data.get("code"))
            retryable = data.get("retryable")
            if not isinstance(retryable, bool):
                retryable = code in RETRYABLE
            if not retryable:
                await self._fail(entry_id, key, record, code, str(data.get("message", "")))
                return
            last_code = code.value
            await awaited(self._redis.hset(tkey, "lastCode", last_code))
            log.info("task_attempt_failed", taskId=key.request_id, code=code.value)
            pause_s = event.retry_after_s or RETRY_BACKOFF_S * 2 ** max(attempts - 1, 0)
            await asyncio.sleep(min(pause_s, RETRY_BACKOFF_MAX_S, max(remaining, 0.0)))

    async def _would_start(self, key: GenKey) -> bool | None:
        """Whether ``start_or_attach`` would start a generation now (an attempt), rather than
        attach to a running one or take a stored result (free); None: the record is gone (it
        would store the user message again)."""
        meta = await self._store.get_meta(key)
        state = meta.get("state")
        if state is None:
            return None
        if state == GenState.QUEUED:
            return True
        if state == GenState.FAILED:
            return meta.get("retryable") == "1"
        return await self._store.is_orphaned(key, meta)

    async def _terminal(self, att: Attachment, remaining_s: float) -> Event | None:
        """The generation's end or error event; None when the task's time ran out first."""
        events = self._feed.events(att, after_seq=-1, received_at=time.monotonic())
        try:
            async with asyncio.timeout(remaining_s), aclosing(events) as stream:
                async for event in stream:
                    if event.kind in (SseEvent.END, SseEvent.ERROR) and not is_ping(event):
                        return event
        except TimeoutError:
            return None
        except (RedisError, OSError) as exc:
            log.warning("task_feed_error", error=type(exc).__name__)
        return Event(
            SseEvent.ERROR,
            b"",
            {"code": ErrorCode.BACKEND_UNAVAILABLE.value, "message": "lost the generation",
             "retryable": True},
        )  # fmt: skip

    async def _done(
        self, entry_id: str, key: GenKey, record: dict[str, str], end: StreamEnd
    ) -> None:
        meta = await self._store.get_meta(key)
        stored = meta.get("assistant")
        if stored:
            message = ChatMessage.model_validate_json(stored)
        else:  # a task that followed a message request's generation (not made by a task)
            message = await self._find_stored(record["roomId"], end.message_id) or ChatMessage(
                id=end.message_id, request_id=key.request_id, role=Role.ASSISTANT,
                content=end.content, character_id=meta.get("characterId") or None,
                created_at=utc_now_iso(),
            )  # fmt: skip
        outcome = TaskOutcome(
            task_id=key.request_id, user_id=key.user_id, room_id=record["roomId"],
            status=TaskState.DONE, message_id=end.message_id, message=message,
        )  # fmt: skip
        fields = {
            "state": TaskState.DONE.value,
            "messageId": end.message_id,
            "content": end.content,
            "finishReason": end.finish_reason.value,
            "usage": end.usage.wire_json(),
            "endedAtMs": str(int(time.time() * 1000)),
        }
        await self._finish(entry_id, key, outcome, fields)

    async def _find_stored(self, room_id: str, message_id: str) -> ChatMessage | None:
        for message in reversed(await self._store.history(room_id, self._settings.history_cap)):
            if message.id == message_id:
                return message
        return None

    async def _fail(
        self,
        entry_id: str,
        key: GenKey,
        record: dict[str, str],
        code: ErrorCode,
        message: str,
    ) -> None:
        outcome = TaskOutcome(
            task_id=key.request_id, user_id=key.user_id, room_id=record["roomId"],
            status=TaskState.FAILED, code=code,
        )  # fmt: skip
        fields = {
            "state": TaskState.FAILED.value,
            "code": code.value,
            "error": message,
            "endedAtMs": str(int(time.time() * 1000)),
        }
        log.warning("task_failed", taskId=key.request_id, code=code.value, reason=message)
        await self._finish(entry_id, key, outcome, fields)

    async def _finish(
        self, entry_id: str, key: GenKey, outcome: TaskOutcome, fields: dict[str, str]
    ) -> None:
        first = await self._end(
            keys=[task_key(key), published_key(key), TASK_STREAM, WEBHOOK_QUEUE,
                  webhook_key(key.slug)],
            args=[
                TASK_GROUP, entry_id, outcome.wire_json(), DONE_CHANNEL, self._s.ttl_s,
                "1" if self.webhooks is not None else "0", key.slug,
                *[x for pair in fields.items() for x in pair],
            ],
        )  # fmt: skip
        if first:
            self._metrics.tasks.labels(outcome.status.value).inc()
            log.info("task_end", taskId=key.request_id, status=outcome.status.value)
            if self.webhooks is not None:
                self.webhooks.wake()


def _accepted(task_id: str, record: dict[str, str]) -> TaskAccepted:
    raw = record.get("userMessage")
    return TaskAccepted(
        task_id=task_id,
        status=TaskState(record.get("state", TaskState.QUEUED)),
        user_message=ChatMessage.model_validate_json(raw) if raw else None,
    )


def _code(value: object) -> ErrorCode:
    try:
        return ErrorCode(str(value))
    except ValueError:
        return ErrorCode.INTERNAL


class WebhookDeliverer:
    """Posts finished tasks' outcomes to ``TASK_WEBHOOK_URL``, signed, with back-off.

    The deliveries wait in Redis (``bs:tasks:webhooks``), so every replica's deliverer serves
    them, also the ones a replica that died had taken (its lease lapses). At least once: a
    receiver that answered 2xx but whose deliverer died before it could say so gets the same
    body again, and should de-duplicate by ``taskId``.
    """

    def __init__(self, redis: Redis, settings: TaskSettings, metrics: Metrics) -> None:
        assert settings.webhook_url is not None
        self._redis = redis
        self._url = settings.webhook_url
        self._secret = settings.webhook_secret
        self._max_attempts = settings.webhook_max_attempts
        self._timeout_s = settings.webhook_timeout_s
        self._lease_ms = int((2 * settings.webhook_timeout_s + 5) * 1000)
        self._metrics = metrics
        self._take = redis.register_script(WEBHOOK_TAKE)
        self._later = redis.register_script(WEBHOOK_LATER)
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout_s), follow_redirects=False
        )
        self._tasks = [
            asyncio.create_task(self._deliver_forever(), name=f"task-webhook-{i}")
            for i in range(WEBHOOK_CONCURRENCY)
        ]

    def wake(self) -> None:
        self._wake.set()

    async def aclose(self) -> None:
        await cancel_and_wait(self._tasks, SHUTDOWN_TIMEOUT_S)
        if self._client is not None:
            await self._client.aclose()

    async def _deliver_forever(self) -> None:
        backoff_s = LOOP_BACKOFF_MIN_S
        while True:
            try:
                slug = await self._take(keys=[WEBHOOK_QUEUE], args=[self._lease_ms])
                backoff_s = LOOP_BACKOFF_MIN_S
                if not slug:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(WEBHOOK_POLL_S):
                            await self._wake.wait()
                    continue
                await self._deliver(str(slug))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # loop edge: Redis away; back off with a cap
                log.warning("task_webhook_loop_error", error=type(exc).__name__)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, LOOP_BACKOFF_MAX_S)

    async def _deliver(self, slug: str) -> None:
        body, attempts = await awaited(self._redis.hmget(webhook_key(slug), ["body", "attempts"]))
        if body is None:
            await awaited(self._redis.zrem(WEBHOOK_QUEUE, slug))
            return
        attempt = int(attempts or 0) + 1
        raw = str(body).encode()
        assert self._client is not None
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: signature(self._secret, timestamp, raw),
            "X-Task-Id": slug.partition("/")[2],
            "X-Delivery-Attempt": str(attempt),
            "User-Agent": "chat-backend-webhook",
        }
        try:
            # httpx's timeouts are per phase (a receiver trickling its answer never trips
            # them): the whole delivery is bounded, well inside its lease, so no second
            # deliverer posts the same body while this one still waits
            async with asyncio.timeout(self._timeout_s):
                resp = await self._client.post(self._url, content=raw, headers=headers)
            ok, why = 200 <= resp.status_code < 300, f"HTTP {resp.status_code}"
        except TimeoutError:
            ok, why = False, "timeout"
        except httpx.HTTPError as exc:
            ok, why = False, type(exc).__name__
        if ok:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(WEBHOOK_QUEUE, slug)
                pipe.delete(webhook_key(slug))
                await pipe.execute()
            self._metrics.task_webhooks.labels("delivered").inc()
            log.info("task_webhook_delivered", attempt=attempt)
            return
        await awaited(self._redis.hset(webhook_key(slug), "attempts", attempt))
        if attempt >= self._max_attempts:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrem(WEBHOOK_QUEUE, slug)
                pipe.delete(webhook_key(slug))
                await pipe.execute()
            self._metrics.task_webhooks.labels("gave_up").inc()
            log.warning("task_webhook_gave_up", attempt=attempt, reason=why)
            return
        delay_s = min(WEBHOOK_BACKOFF_MAX_S, WEBHOOK_BACKOFF_S * 2 ** (attempt - 1))
        delay_s *= random.uniform(0.9, 1.1)
        await self._later(keys=[WEBHOOK_QUEUE], args=[slug, int(delay_s * 1000)])
        self._metrics.task_webhooks.labels("retry").inc()
        log.info("task_webhook_retry", attempt=attempt, reason=why, delay_s=round(delay_s, 2))
