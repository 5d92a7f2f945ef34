"""Batch tasks, the bridge's half (CONTRACT.md section 1 ``mode: "batch"``, issue 12).

A batch ``send_message`` is queued on the backend (``POST /chat/tasks``) and accepted at once;
the backend publishes the task's ``TaskOutcome`` once on the Redis channel ``bs:tasks:done`` when
it ends, and every bridge replica listens. bridge/README.md "Batch tasks" has the flow and the
exactly-once argument; in short:

- ``RECORD_SCRIPT`` is the one decision: ``SET bridge:task:delivered:{u}:{t} NX`` and, in the
  same script, the outcome stored as undelivered for the user. Exactly one caller wins it per
  task, whichever path it came by (the pub/sub message on any replica, a ``join_room`` that
  found the task finished by asking the backend, a resent requestId), and only the winner
  announces it: one control message (``bridge:task_outcome``) through the Socket.IO queue, which
  every replica receives once (the sender's replica runs it directly).
- Each replica, for that control: the assistant ``new_message`` to its sockets in the task's
  room, ``task_done`` to its sockets of the sender, and the undelivered record removed when
  one of those was open. A socket lives on one replica, and that replica sends each task's
  two events at most once per socket (``_seen``), whichever path they come by.
- A sender with no socket online leaves the record in place: the next ``join_room`` of that
  user (any room) takes every undelivered record in one script (read and delete together), so
  one join gets them, once, after its ack.

Redis keys (every one expires; ``KEEP_S`` after its last write, the marker ``DELIVERED_KEEP_S``):
- ``bridge:tasks:{userId}``           sorted set taskId -> time: the user's tasks the bridge
  tracks, unfinished and finished-undelivered; at most ``MAX_PER_USER`` (the oldest dropped).
- ``bridge:tasks:{userId}:outcomes``  hash taskId -> TaskOutcome JSON: finished, not yet
  delivered to a socket of the user (only tasks in the sorted set).
- ``bridge:task:delivered:{userId}:{taskId}``  the marker of the one delivery.

A ``join_room`` with unfinished tasks asks the backend about them in the background, at most
one such recovery per user at a time and one per ``RECOVER_EVERY_S`` per user on a replica (a
client looping ``join_room`` costs nothing more).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge import payloads
from bridge.errors import StoreError, UpstreamError, UpstreamHttpError, store_errors
from bridge.metrics import Metrics
from bridge.payloads import Payload
from bridge.sio import SocketServer
from bridge.tracing import random_traceparent
from bridge.upstream import TaskUpstream
from contracts import (
    ChatMessage,
    ChatRequest,
    ContractError,
    Path,
    Role,
    ServerEvent,
    TaskAccepted,
    TaskOutcome,
    TaskState,
    TaskStatus,
    parse,
    parse_json,
    utc_now_iso,
)
from contracts.aio import awaited

log = structlog.get_logger("bridge.tasks")

CHANNEL = "bs:tasks:done"  # where the backend publishes TaskOutcome (contracts.TaskOutcome)
CONTROL = "bridge:task_outcome"  # the winner's announcement to every replica (never to a client)
PREFIX = "bridge:"
KEEP_S = 86_400  # a tracked task, an undelivered outcome: kept a day
# The delivery marker outlives the backend's task record (TASK_TTL_S, 7 days by default; the
# backend's README says to keep it under this): while the backend still answers a resent
# requestId with the ended task, the marker must still say it was delivered, or the outcome
# would be delivered again (a second answer, a second task_done).
DELIVERED_KEEP_S = 8 * 86_400
MAX_PER_USER = 100  # tracked tasks per user (unfinished + undelivered), the oldest dropped
RECOVER_MAX = 20  # unfinished tasks a join_room asks the backend about (the oldest first)
RECOVER_CONCURRENCY = 8  # status requests at once per replica for recovery
RECOVER_EVERY_S = 10.0  # a join's recovery per user on this replica, at most this often
RECOVER_USERS_MAX = 10_000  # users whose last recovery this replica remembers (the oldest go)
SEEN_PER_SOCKET = 64  # tasks per socket whose events it was sent (at most once each)
LISTEN_RETRY_FIRST_S = 0.1
LISTEN_RETRY_MAX_S = 2.0
FINISHED = (TaskState.DONE, TaskState.FAILED)

# Shared by the scripts: drop tasks older than ARGV keep and beyond the cap (oldest first), from
# the sorted set and the outcomes; re-arm both keys' expiry.
_TRIM = """
local function drop(zset, hash, ids)
  if #ids > 0 then
    redis.call('ZREM', zset, unpack(ids))
    redis.call('HDEL', hash, unpack(ids))
  end
end
local function trim(zset, hash, now, keep, cap)
  drop(zset, hash, redis.call('ZRANGEBYSCORE', zset, '-inf', '(' .. (now - keep)))
  local n = redis.call('ZCARD', zset)
  if n > cap then drop(zset, hash, redis.call('ZRANGE', zset, 0, n - cap - 1)) end
  redis.call('EXPIRE', zset, keep)
  if redis.call('EXISTS', hash) == 1 then redis.call('EXPIRE', hash, keep) end
end
"""

# KEYS: the user's sorted set, outcomes. ARGV: taskId, now, keep, cap.
TRACK_SCRIPT = (
    _TRIM
    + """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
trim(KEYS[1], KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""
)

# The one delivery decision. KEYS: marker, sorted set, outcomes. ARGV: taskId, outcome JSON,
# now, keep, cap, marker keep. 1: this caller delivers (the outcome is stored as undelivered,
# the task kept tracked); 0: somebody already did (a task still tracked but neither
# undelivered nor unfinished any more is dropped from the set).
RECORD_SCRIPT = (
    _TRIM
    + """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[6]) then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  trim(KEYS[2], KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
  return 1
end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 0
"""
)

# An outcome taken at a join that its socket could not be given (it closed): undelivered again.
# KEYS: sorted set, outcomes. ARGV: taskId, outcome JSON, now, keep, cap.
RESTORE_SCRIPT = (
    _TRIM
    + """
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
trim(KEYS[1], KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
return 1
"""
)

# At join_room. KEYS: sorted set, outcomes. Returns {unfinished ids (oldest first), the
# undelivered outcomes as a flat [id, json, ...]}, and takes the latter (read and delete in one
# step: of two joins at once, one gets them).
JOIN_SCRIPT = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local all = redis.call('HGETALL', KEYS[2])
local done = {}
if #all > 0 then
  redis.call('DEL', KEYS[2])
  local taken = {}
  for i = 1, #all, 2 do
    done[all[i]] = true
    taken[#taken + 1] = all[i]
  end
  redis.call('ZREM', KEYS[1], unpack(taken))
end
local unfinished = {}
for _, id in ipairs(ids) do
  if not done[id] then unfinished[#unfinished + 1] = id end
end
return {unfinished, all}
"""


def _set_key(user_id: str) -> str:
    return f"{PREFIX}tasks:{user_id}"


def _outcomes_key(user_id: str) -> str:
    return f"{PREFIX}tasks:{user_id}:outcomes"


def _marker_key(user_id: str, task_id: str) -> str:
    return f"{PREFIX}task:delivered:{user_id}:{task_id}"


class TaskStore:
    """The user's tracked tasks and undelivered outcomes in Redis (keys: module docstring)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._track = redis.register_script(TRACK_SCRIPT)
        self._record = redis.register_script(RECORD_SCRIPT)
        self._join = redis.register_script(JOIN_SCRIPT)
        self._restore = redis.register_script(RESTORE_SCRIPT)

    async def restore(self, outcome: TaskOutcome) -> None:
        user, task = outcome.user_id, outcome.task_id
        args: list[str | int | float] = [
            task, outcome.wire_json(), time.time(), KEEP_S, MAX_PER_USER
        ]  # fmt: skip
        async with store_errors("restore task outcome"):
            await self._restore(keys=[_set_key(user), _outcomes_key(user)], args=args)

    async def track(self, user_id: str, task_id: str) -> None:
        keys = [_set_key(user_id), _outcomes_key(user_id)]
        async with store_errors("track task"):
            await self._track(keys=keys, args=[task_id, time.time(), KEEP_S, MAX_PER_USER])

    async def untrack(self, user_id: str, task_id: str) -> None:
        async with store_errors("untrack task"):
            await awaited(self._redis.zrem(_set_key(user_id), task_id))

    async def record(self, outcome: TaskOutcome) -> bool:
        """Whether this caller is the one that delivers ``outcome`` (see ``RECORD_SCRIPT``)."""
        user, task = outcome.user_id, outcome.task_id
        keys = [_marker_key(user, task), _set_key(user), _outcomes_key(user)]
        args: list[str | int | float] = [
            task, outcome.wire_json(), time.time(), KEEP_S, MAX_PER_USER, DELIVERED_KEEP_S
        ]  # fmt: skip
        async with store_errors("record task outcome"):
            return bool(await self._record(keys=keys, args=args))

    async def delivered(self, user_id: str, task_id: str) -> None:
        """A socket of the user was sent the outcome live: it is no longer undelivered."""
        async with store_errors("task delivered"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(_outcomes_key(user_id), task_id)
                pipe.zrem(_set_key(user_id), task_id)
                await pipe.execute()

    async def at_join(self, user_id: str) -> tuple[list[str], list[TaskOutcome]]:
        """The user's unfinished tasks, and the undelivered outcomes, taken (see JOIN_SCRIPT)."""
        async with store_errors("tasks at join"):
            unfinished, flat = await self._join(keys=[_set_key(user_id), _outcomes_key(user_id)])
        taken = []
        for raw in flat[1::2]:
            try:
                taken.append(parse_json(TaskOutcome, raw))
            except ContractError:
                log.warning("task_outcome_unreadable")
        return [str(task_id) for task_id in unfinished], taken


def outcome_of(user_id: str, status: TaskStatus) -> TaskOutcome:
    """A ``TaskOutcome`` from a finished task's status (when the published one was missed)."""
    message = None
    if status.status is TaskState.DONE and status.message_id and status.content is not None:
        message = ChatMessage(
            id=status.message_id, request_id=status.task_id, role=Role.ASSISTANT,
            content=status.content, created_at=utc_now_iso(),
        )  # fmt: skip
    return TaskOutcome(
        task_id=status.task_id, user_id=user_id, room_id=status.room_id,
        status=TaskState.DONE if status.status is TaskState.DONE else TaskState.FAILED,
        message_id=status.message_id, code=status.code, message=message,
    )  # fmt: skip


class BatchTasks:
    """One replica's part of batch mode: submit, listen, deliver (module docstring)."""

    def __init__(self, redis: Redis, upstream: TaskUpstream, metrics: Metrics) -> None:
        self.store = TaskStore(redis)
        self._redis = redis
        self._upstream = upstream
        self._metrics = metrics
        self._server: SocketServer | None = None
        self._sids: dict[str, set[str]] = {}  # userId -> this replica's sockets of the user
        self._user_of: dict[str, str] = {}  # sid -> userId
        self._seen: dict[str, OrderedDict[str, None]] = {}  # sid -> "{kind}:{taskId}" sent
        self._recovering: asyncio.Semaphore | None = None
        self._recovering_users: set[str] = set()  # a join's recovery in progress here
        self._recovered_at: OrderedDict[str, float] = OrderedDict()  # userId -> its last start
        self.subscribed = False

    @property
    def server(self) -> SocketServer:
        assert self._server is not None, "bind() first"
        return self._server

    def bind(self, server: SocketServer) -> None:
        self._server = server
        server.on_control(CONTROL, self._on_control)

    # ---- sockets --------------------------------------------------------------------------

    def online(self, sid: str, user_id: str) -> None:
        self._user_of[sid] = user_id
        self._sids.setdefault(user_id, set()).add(sid)

    def offline(self, sid: str) -> None:
        self._seen.pop(sid, None)
        user_id = self._user_of.pop(sid, None)
        if user_id is None:
            return
        sids = self._sids.get(user_id)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del self._sids[user_id]

    # ---- send_message and join_room -------------------------------------------------------

    async def submit(self, request: ChatRequest, traceparent: str) -> TaskAccepted:
        """Track the task (before it can end), then queue it on the backend; raises
        ``StoreError`` or the backend's ``UpstreamError`` (the task is then not tracked)."""
        await self.store.track(request.user_id, request.request_id)
        try:
            return await self._upstream.create_task(request, traceparent)
        except UpstreamError:
            with contextlib.suppress(StoreError):
                await self.store.untrack(request.user_id, request.request_id)
            raise

    async def at_join(self, user_id: str) -> tuple[list[str], list[TaskOutcome]]:
        return await self.store.at_join(user_id)

    def after_join(
        self, sid: str, user_id: str, unfinished: list[str], taken: list[TaskOutcome]
    ) -> None:
        """After the join ack: the outcomes the join took, to this socket (the assistant
        message too when it is in the task's room), then the unfinished tasks checked with the
        backend in the background (an outcome whose publication no replica heard)."""
        for outcome in taken:
            if not self._give(sid, outcome):
                self.server.spawn(self._restore(outcome))
        if unfinished and self._may_recover(user_id):
            task = self.server.spawn(self._recover_all(user_id, unfinished[:RECOVER_MAX]))
            self._recovering_users.add(user_id)
            task.add_done_callback(lambda _t: self._recovering_users.discard(user_id))

    def _may_recover(self, user_id: str) -> bool:
        """Whether a join of ``user_id`` starts a recovery now: none of that user's is in
        progress here, and the last started ``RECOVER_EVERY_S`` ago or more. What it remembers
        is bounded: only starts of the last ``RECOVER_EVERY_S`` matter (oldest first, so those
        before go from the front), at most ``RECOVER_USERS_MAX`` of them."""
        if user_id in self._recovering_users:
            return False
        now = time.monotonic()
        last = self._recovered_at.get(user_id)
        if last is not None and now - last < RECOVER_EVERY_S:
            return False
        self._recovered_at.pop(user_id, None)
        self._recovered_at[user_id] = now  # the newest last: the dict is in start order
        while self._recovered_at and (
            len(self._recovered_at) > RECOVER_USERS_MAX
            or now - next(iter(self._recovered_at.values())) >= RECOVER_EVERY_S
        ):
            self._recovered_at.popitem(last=False)
        return True

    async def resent(self, sid: str, user_id: str, task_id: str) -> None:
        """A requestId sent again for a task that has ended: delivered now if it never was,
        else this socket alone is told again (its fresh answer, like a resent message_ack)."""
        outcome = await self._fetch(user_id, task_id)
        if outcome is None:
            return
        try:
            if await self.deliver(outcome):
                return
        except StoreError:
            log.warning("task_outcome_not_recorded", taskId=task_id)
        if sid in self._user_of:  # again, even to a socket that had it: it asked again
            self.server.emit_to(sid, ServerEvent.TASK_DONE, _task_done(outcome))

    # ---- delivery -------------------------------------------------------------------------

    async def deliver(self, outcome: TaskOutcome) -> bool:
        """Record ``outcome`` and announce it to every replica, unless it already was
        (anywhere); whether this call did. Raises ``StoreError`` (then nobody did: the task is
        still tracked, so a join will ask the backend)."""
        if not await self.store.record(outcome):
            return False
        ok = outcome.status is TaskState.DONE
        self._metrics.requests.labels(path=Path.BATCH.value, ok=str(ok).lower()).inc()
        if outcome.code is not None:
            self._metrics.errors.labels(code=outcome.code.value).inc()
        log.info(
            "task_done", taskId=outcome.task_id, roomId=outcome.room_id, userId=outcome.user_id,
            ok=ok, code=outcome.code,
        )  # fmt: skip
        try:
            await self.server.control(outcome.room_id, CONTROL, outcome.wire())
        except (RedisError, OSError) as exc:
            # here it ran; other replicas missed it: the record stays undelivered unless a
            # local socket of the sender took it, and the sender's next join gets it then
            log.warning("task_announce_failed", taskId=outcome.task_id, error=type(exc).__name__)
        return True

    def _on_control(self, room_id: str, payload: Payload) -> None:
        """On every replica, once per announced outcome: the room's assistant message to the
        local sockets in the room, ``task_done`` to the sender's local sockets."""
        try:
            outcome = parse(TaskOutcome, payload)
        except ContractError:
            log.warning("task_control_malformed")
            return
        if outcome.message is not None:
            event = _new_message(outcome)
            for sid in self.server.local_sids(outcome.room_id):
                self._emit_once(sid, f"m:{outcome.task_id}", ServerEvent.NEW_MESSAGE, event)
        sids = self._sids.get(outcome.user_id)
        if sids:
            done = _task_done(outcome)
            key = f"d:{outcome.task_id}"
            sent = [self._emit_once(sid, key, ServerEvent.TASK_DONE, done) for sid in list(sids)]
            if any(sent):
                # queued on an open socket of the sender: delivered, the record goes (a socket
                # already closing when it was sent does not count: it stays for the next join)
                self.server.spawn(self._delivered(outcome.user_id, outcome.task_id))

    def _give(self, sid: str, outcome: TaskOutcome) -> bool:
        """A taken outcome to one socket; whether it has it (else it must be restored)."""
        if outcome.message is not None and self.server.in_room(sid, outcome.room_id):
            event = _new_message(outcome)
            self._emit_once(sid, f"m:{outcome.task_id}", ServerEvent.NEW_MESSAGE, event)
        done = _task_done(outcome)
        return self._emit_once(sid, f"d:{outcome.task_id}", ServerEvent.TASK_DONE, done)

    async def _restore(self, outcome: TaskOutcome) -> None:
        try:
            await self.store.restore(outcome)
        except StoreError:
            log.warning("task_outcome_lost", taskId=outcome.task_id)

    def _emit_once(self, sid: str, key: str, event: str, payload: Payload) -> bool:
        """At most once per socket and key, whichever path (live, join, recovery) it came by;
        whether the socket has it (queued now on its open transport, or before)."""
        if sid not in self._user_of:
            return False  # not (or no longer) connected here
        seen = self._seen.get(sid)
        if seen is None:
            seen = self._seen[sid] = OrderedDict()
        if key in seen:
            return True
        if not self.server.emit_to(sid, event, payload):
            return False
        seen[key] = None
        while len(seen) > SEEN_PER_SOCKET:
            seen.popitem(last=False)
        return True

    async def _delivered(self, user_id: str, task_id: str) -> None:
        try:
            await self.store.delivered(user_id, task_id)
        except StoreError:
            log.warning("task_delivery_not_recorded", taskId=task_id)

    # ---- recovery (a publication no replica heard) ----------------------------------------

    async def _fetch(self, user_id: str, task_id: str) -> TaskOutcome | None:
        """The task's outcome from the backend when it has ended; None while it runs, when
        the backend is unavailable, or when it has no such task (then it is not tracked)."""
        try:
            status = await self._upstream.task_status(task_id, user_id, random_traceparent())
        except UpstreamHttpError as exc:
            if exc.status == 404:
                with contextlib.suppress(StoreError):
                    await self.store.untrack(user_id, task_id)
            return None
        except UpstreamError:
            return None
        if status.status not in FINISHED:
            return None
        return outcome_of(user_id, status)

    async def _recover(self, user_id: str, task_id: str) -> None:
        if self._recovering is None:
            self._recovering = asyncio.Semaphore(RECOVER_CONCURRENCY)
        async with self._recovering:
            outcome = await self._fetch(user_id, task_id)
            if outcome is None:
                return
            try:
                if await self.deliver(outcome):
                    log.info("task_recovered", taskId=task_id)
            except StoreError:
                log.warning("task_outcome_not_recorded", taskId=task_id)

    async def _recover_all(self, user_id: str, task_ids: list[str]) -> None:
        await asyncio.gather(*(self._recover(user_id, task_id) for task_id in task_ids))

    async def _recover_online(self) -> None:
        """After the subscription was lost: the unfinished tasks of every user online here."""
        for user_id in list(self._sids):
            try:
                unfinished, taken = await self.store.at_join(user_id)
            except StoreError:
                return
            sids = list(self._sids.get(user_id, ()))
            for outcome in taken:
                if not [sid for sid in sids if self._give(sid, outcome)]:
                    await self._restore(outcome)
            if unfinished:
                await self._recover_all(user_id, unfinished[:RECOVER_MAX])

    # ---- the subscription -----------------------------------------------------------------

    async def listen_forever(self) -> None:
        """Subscribe to the backend's outcomes; re-subscribe after any failure (capped back-off);
        after a loss, what may have been published meanwhile is asked of the backend."""
        sleep_s = LISTEN_RETRY_FIRST_S
        lost = False
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.subscribed = True
                    if lost:
                        log.info("task_subscription_back")
                        self.server.spawn(self._recover_online())
                    lost = False
                    sleep_s = LISTEN_RETRY_FIRST_S
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self.server.spawn(self._published(message.get("data")))
            except Exception as exc:  # the listener never exits but by cancellation
                if not lost:
                    log.warning("task_subscription_lost", error=type(exc).__name__)
            finally:
                self.subscribed = False
            lost = True
            await asyncio.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, LISTEN_RETRY_MAX_S)

    async def _published(self, data: object) -> None:
        if not isinstance(data, str | bytes):
            return
        try:
            outcome = parse_json(TaskOutcome, data)
        except ContractError as exc:
            log.warning("task_outcome_malformed", detail=exc.message)
            return
        try:
            await self.deliver(outcome)
        except StoreError:
            # not recorded: the task is still tracked, the sender's next join asks the backend
            log.warning("task_outcome_not_recorded", taskId=outcome.task_id)


def _new_message(outcome: TaskOutcome) -> Payload:
    assert outcome.message is not None
    return {"roomId": outcome.room_id, "message": outcome.message.wire()}


def _task_done(outcome: TaskOutcome) -> Payload:
    message_id = outcome.message_id or (outcome.message.id if outcome.message else None)
    return payloads.task_done(
        outcome.task_id, outcome.room_id, message_id, ok=outcome.status is TaskState.DONE,
        code=outcome.code,
    )  # fmt: skip


__all__ = ["CHANNEL", "BatchTasks", "TaskStore", "outcome_of"]
