"""Socket.IO event handlers: connect, join/leave, send, cancel (CONTRACT.md section 1).

Every handler validates its payload with the contract models (``contracts.parse``), answers
every failure with its code in the ack, and never lets an exception escape to python-socketio
(``SocketServer.dispatch`` is the last guard). ``send_message`` returns at once: the relay
task acks when the backend's stream opens (or the fallback request is sent).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from opentelemetry.util.types import AttributeValue
from redis.exceptions import RedisError

from bridge import payloads
from bridge.auth import Authenticator, AuthError, Identity
from bridge.breaker import NOT_COUNTED, STREAM, Breaker, verdict
from bridge.errors import PayloadError, StoreError, UpstreamError, UpstreamHttpError
from bridge.fanout import CHUNK, START
from bridge.flags import FlagStore, decide
from bridge.metrics import Metrics
from bridge.payloads import Payload
from bridge.relay import GAP_UNREPAIRED, Outcome, Relay, RelayJob
from bridge.rooms import InFlight, RoomRegistry
from bridge.settings import Settings
from bridge.sinks import RoomSink, follow, run_complete
from bridge.sio import AckFn, Refused, SocketServer
from bridge.tasks import BatchTasks
from bridge.tracing import Tracing, random_traceparent
from bridge.upstream import Upstream
from contracts import (
    CancelMessage,
    ChangeMember,
    ChatRequest,
    ClientEvent,
    ClientTiming,
    ContractError,
    ErrorCode,
    JoinRoom,
    LeaveRoom,
    Mode,
    Path,
    PostMessage,
    PostRequest,
    RoomEventType,
    SendMessage,
    ServerEvent,
    TaskState,
    WireModel,
    check_content,
    parse,
)

M = TypeVar("M", bound=WireModel)

log = structlog.get_logger("bridge.handlers")

MAX_FOLLOWERS_PER_SOCKET = 16
MAX_ROOMS_PER_SOCKET = 64
MAX_TIMINGS_DUE_PER_SOCKET = 16
MAX_MEMBERS = 1000  # members an owner may add to one room
MEMBER_REMOVED_CONTROL = "bridge:member_removed"
STORE_BUSY = "room state unavailable, try again"


@dataclass
class _Active:
    relay: Relay
    sink: RoomSink


class ChatHandlers:
    """The bridge's behaviour per client event; wired to a ``SocketServer`` by ``bind``."""

    def __init__(
        self,
        *,
        settings: Settings,
        auth: Authenticator,
        rooms: RoomRegistry,
        flags: FlagStore,
        upstream: Upstream,
        metrics: Metrics,
        tracing: Tracing | None = None,
        breaker: Breaker | None = None,
        tasks: BatchTasks,
    ) -> None:
        self._settings = settings
        self._tasks = tasks
        self._tracing = tracing or Tracing(None)
        self._breaker = breaker or Breaker("local", enabled=False)
        self._auth = auth
        self._rooms = rooms
        self._flags = flags
        self._upstream = upstream
        self._metrics = metrics
        self._server: SocketServer | None = None
        self._identities: dict[str, Identity] = {}
        self._relays: dict[tuple[str, str], _Active] = {}
        self._followers: dict[str, int] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        # sid -> the requestIds it sent whose client_timing is still due (bounded per socket):
        # a page reports one timing per request it sent, and nothing else becomes a sample.
        self._timing_due: dict[str, OrderedDict[str, None]] = {}
        # (roomId, userId) -> this replica's sockets of the user in the room (presence)
        self._online: dict[tuple[str, str], int] = {}

    @property
    def server(self) -> SocketServer:
        assert self._server is not None, "bind() first"
        return self._server

    def bind(self, server: SocketServer) -> None:
        self._server = server
        server.on("join_room", self.join_room)
        server.on("leave_room", self.leave_room)
        server.on("send_message", self.send_message)
        server.on("cancel_message", self.cancel_message)
        server.on(ClientEvent.CLIENT_TIMING.value, self.client_timing)
        server.on(ClientEvent.POST_MESSAGE.value, self.post_message)
        server.on(ClientEvent.ADD_MEMBER.value, self.add_member)
        server.on(ClientEvent.REMOVE_MEMBER.value, self.remove_member)
        server.on_control(MEMBER_REMOVED_CONTROL, self._member_removed)
        self._tasks.bind(server)

    def active_relays(self) -> int:
        return len(self._relays)

    # ---- connection -----------------------------------------------------------------------

    async def connect(self, sid: str, environ: dict[str, Any], auth: object) -> None:
        try:
            ident = self._identities[sid] = self._auth.identify(auth, environ)
        except AuthError as exc:
            self._metrics.rejections.labels(code=ErrorCode.UNAUTHORIZED.value).inc()
            raise Refused(ErrorCode.UNAUTHORIZED.value, str(exc)) from None
        self._tasks.online(sid, ident.user_id)  # task_done reaches every socket of the sender
        if ident.expires_at is not None:
            # CONTRACT.md "Connecting": exp holds for the whole connection. One timer per
            # socket, set once: nothing per event.
            delay_s = max(0.0, ident.expires_at - time.time())
            loop = asyncio.get_running_loop()
            self._expiry[sid] = loop.call_later(delay_s, self._expire, sid)

    def _expire(self, sid: str) -> None:
        """The token's exp passed: say so, then disconnect. Relays started by this socket go on
        (they belong to the room); a rejoin with a fresh token is replayed what is in flight."""
        self._expiry.pop(sid, None)
        if sid not in self._identities:
            return
        self._metrics.expired_sessions.inc()
        log.info("session_expired", sid=sid)
        self.server.emit_to(sid, ServerEvent.SESSION_EXPIRED, payloads.session_expired())
        self.server.spawn(self.server.disconnect(sid))

    async def disconnect(self, sid: str) -> None:
        ident = self._identities.pop(sid, None)
        self._tasks.offline(sid)
        if ident is not None:
            for room_id in self.server.rooms_of(sid):
                self.server.spawn(self._depart(room_id, ident.user_id))
        self._followers.pop(sid, None)
        self._timing_due.pop(sid, None)
        timer = self._expiry.pop(sid, None)
        if timer is not None:
            timer.cancel()
        # Still in its rooms here: python-socketio removes it after this handler returns.
        emptied = [r for r in self.server.rooms_of(sid) if self.server.local_members(r) <= 1]
        if emptied:
            self.server.spawn(self._absent(emptied))

    async def _absent(self, rooms: list[str]) -> None:
        for room_id in rooms:
            if self.server.local_members(room_id) == 0:
                try:
                    await self._rooms.absent(room_id)
                    # A socket may have joined while the removal was on its way (its join's
                    # script ran before our SREM): the replica would then be missing from the
                    # hosts set, and the other replicas would stop sending it the room's events.
                    if self.server.local_members(room_id) > 0:
                        await self._rooms.present(room_id)
                except StoreError:
                    log.warning("presence_not_cleared", roomId=room_id)

    # ---- rooms ----------------------------------------------------------------------------

    async def join_room(self, sid: str, data: object, ack: AckFn) -> None:
        try:
            ident = self._identity(sid)
            msg = self._parse(JoinRoom, data)
            online = await self._enter(sid, ident, msg.room_id)
            if online is None:
                online = (await self._rooms.presence(msg.room_id, ident.user_id, "list")).online
            in_flight = await self._rooms.in_flight(msg.room_id)
            # last: it takes the user's undelivered batch outcomes (given after the ack)
            unfinished, taken = await self._tasks.at_join(ident.user_id)
        except PayloadError as exc:
            return self._refuse(ack, exc.code, exc.message)
        except StoreError:
            return self._refuse(ack, ErrorCode.BACKEND_UNAVAILABLE, STORE_BUSY)
        in_flight_ids = [item.request_id for item in in_flight]
        ack(payloads.join_ack(msg.room_id, in_flight_ids, online, pending_tasks=unfinished))
        for item in in_flight:
            self._replay(sid, msg.room_id, item)
        self._tasks.after_join(sid, ident.user_id, unfinished, taken)

    async def leave_room(self, sid: str, data: object, ack: AckFn) -> None:
        try:
            self._identity(sid)
            msg = self._parse(LeaveRoom, data)
        except PayloadError as exc:
            return self._refuse(ack, exc.code, exc.message)
        if self.server.in_room(sid, msg.room_id):
            await self.server.leave_room(sid, msg.room_id)
            self.server.spawn(self._depart(msg.room_id, self._identity(sid).user_id))
            if self.server.local_members(msg.room_id) == 0:
                self.server.spawn(self._absent([msg.room_id]))
        ack({"ok": True})

    async def _enter(self, sid: str, ident: Identity, room_id: str) -> list[str] | None:
        """Let the socket into the room (or raise FORBIDDEN); when it was not in the room yet,
        its presence is recorded and the users online are returned."""
        if not self.server.in_room(sid, room_id):
            if len(self.server.rooms_of(sid)) >= MAX_ROOMS_PER_SOCKET:
                raise PayloadError(ErrorCode.RATE_LIMITED, "too many rooms on one connection")
        # Presence is written (by join) before in-flight generations are read and before the
        # room's first event (relay): whichever side writes last sees the other.
        granted = ident.rooms.admits(room_id)
        if not await self._rooms.join(room_id, ident.user_id, granted=granted):
            raise PayloadError(ErrorCode.FORBIDDEN, "not a member of this room")
        if self.server.in_room(sid, room_id):
            return None
        await self.server.enter_room(sid, room_id)
        return await self._arrive(room_id, ident.user_id, sid)

    # ---- presence --------------------------------------------------------------------------

    async def _arrive(self, room_id: str, user_id: str, sid: str) -> list[str] | None:
        """Socket ``sid`` of ``user_id`` entered the room here: the rest of the room hears
        ``joined`` when it is the user's first socket there on any replica (the socket itself is
        not told; a room of one user so never sees its own presence)."""
        key = (room_id, user_id)
        self._online[key] = self._online.get(key, 0) + 1
        if self._online[key] > 1:
            return None
        try:
            presence = await self._rooms.presence(room_id, user_id, "join")
        except StoreError:
            log.warning("presence_not_recorded", roomId=room_id)
            return None
        if not presence.elsewhere:
            self._room_event(
                room_id, RoomEventType.JOINED, user_id, publish=presence.remote, skip_sid=sid
            )
        return presence.online

    async def _depart(self, room_id: str, user_id: str) -> None:
        """A socket of ``user_id`` left the room here: ``left`` when it was the user's last."""
        key = (room_id, user_id)
        count = self._online.get(key, 0) - 1
        if count > 0:
            self._online[key] = count
            return
        self._online.pop(key, None)
        try:
            presence = await self._rooms.presence(room_id, user_id, "leave")
        except StoreError:
            log.warning("presence_not_cleared", roomId=room_id)
            return
        if not presence.elsewhere:
            self._room_event(room_id, RoomEventType.LEFT, user_id, publish=presence.remote)

    def _room_event(
        self,
        room_id: str,
        kind: RoomEventType,
        user_id: str,
        *,
        publish: bool,
        skip_sid: str | None = None,
    ) -> None:
        """Presence to the room's local sockets (but ``skip_sid``), and through the queue when
        another live replica serves the room (``publish``): a room used on one replica only, the
        common case, costs no publish."""
        event = payloads.room_event(room_id, kind, user_id)
        if skip_sid is None:
            self.server.emit_local(room_id, ServerEvent.ROOM_EVENT, event)
        else:
            self.server.emit_local_except(room_id, ServerEvent.ROOM_EVENT, event, skip_sid)
        if publish:  # not awaited: a slow Redis must not hold up the send or join
            self.server.spawn(self._publish_quietly(room_id, ServerEvent.ROOM_EVENT, event))

    async def _publish_quietly(self, room_id: str, event: str, payload: Payload) -> None:
        try:
            await self.server.publish(room_id, event, payload)
        except (RedisError, OSError) as exc:
            log.warning("publish_failed", roomId=room_id, error=type(exc).__name__)

    def _replay(self, sid: str, room_id: str, item: InFlight) -> None:
        active = self._relays.get((room_id, item.request_id))
        if active is not None:
            relay = active.relay
            if relay.announced and relay.message_id is not None:
                # From this replica's buffer, in one step (no await): nothing can interleave.
                self.server.emit_to(
                    sid,
                    START,
                    payloads.start(
                        relay.request_id, room_id, relay.message_id, relay.queue_position
                    ),
                )
                for seq, text in enumerate(relay.parts):
                    chunk = payloads.chunk(relay.request_id, room_id, relay.message_id, seq, text)
                    self.server.emit_to(sid, CHUNK, chunk)
            return
        if self._followers.get(sid, 0) >= MAX_FOLLOWERS_PER_SOCKET:
            return
        self._followers[sid] = self._followers.get(sid, 0) + 1
        self.server.spawn(self._follow(sid, room_id, item))

    async def _follow(self, sid: str, room_id: str, item: InFlight) -> None:
        try:
            await follow(
                server=self.server, upstream=self._upstream, sid=sid, room_id=room_id,
                item=item, traceparent=random_traceparent(), timeouts=self._settings.timeouts,
            )  # fmt: skip
        except Exception:
            log.exception("follower_failed", requestId=item.request_id, roomId=room_id)
        finally:
            if sid in self._followers:
                self._followers[sid] = max(0, self._followers[sid] - 1)

    # ---- messages -------------------------------------------------------------------------

    async def send_message(self, sid: str, data: object, ack: AckFn) -> None:
        received_at = time.monotonic()
        request_id: str | None = None
        try:
            ident = self._identity(sid)
            msg = self._parse(SendMessage, data)
            request_id = msg.request_id or uuid.uuid4().hex
            retry_after_ms = await self._admit(sid, ident, msg.room_id, msg.content)
        except (ContractError, PayloadError) as exc:
            return self._reject(ack, request_id, exc.code, exc.message)
        except StoreError:
            # Redis down or its pool exhausted under load: an expected, retryable condition.
            return self._reject(ack, request_id, ErrorCode.BACKEND_UNAVAILABLE, STORE_BUSY)
        if retry_after_ms is not None:
            return self._rate_limited(ack, request_id, retry_after_ms)
        request = ChatRequest(
            request_id=request_id, room_id=msg.room_id, user_id=ident.user_id,
            content=msg.content, character_id=msg.character_id,
        )  # fmt: skip
        if msg.mode is Mode.BATCH:
            return await self._batch(sid, request, received_at, ack)
        flags = self._flags.current
        decision = decide(flags, ident.user_id, ident.roles)
        reason = decision.reason
        ticket = self._breaker.allow_stream() if decision.streaming else None
        if decision.streaming and ticket is None:
            reason = "breaker"  # this replica's stream path is failing: the complete path
        path = Path.STREAM if ticket is not None else Path.COMPLETE
        structlog.contextvars.bind_contextvars(
            requestId=request_id, roomId=msg.room_id, userId=ident.user_id,
            characterId=msg.character_id, path=path.value, flag=reason,
        )  # fmt: skip
        trace = self._tracing.request(
            "send_message", received_at,
            {"chat.request_id": request_id, "chat.room_id": msg.room_id,
             "chat.path": path.value, "chat.flag": reason},
        )  # fmt: skip
        job = RelayJob(
            request=request, received_at=received_at, fallback=flags.fallback, trace=trace
        )
        self._expect_timing(sid, request_id)
        if ticket is not None:
            self.server.spawn(self._stream(sid, job, ack, ticket))
        else:
            self.server.spawn(self._complete(sid, job, ack))

    async def _batch(self, sid: str, request: ChatRequest, received_at: float, ack: AckFn) -> None:
        """``mode: "batch"``: a job on the backend's queue, accepted as soon as it is queued;
        the room gets the user's message now and the assistant's when the job ends, the
        sender ``task_done`` (bridge/tasks.py). Not the stream path: no flags, no breaker."""
        rid, room_id = request.request_id, request.room_id
        structlog.contextvars.bind_contextvars(
            requestId=rid, roomId=room_id, userId=request.user_id,
            characterId=request.character_id, path=Path.BATCH.value,
        )  # fmt: skip
        trace = self._tracing.request(
            "send_message", received_at,
            {"chat.request_id": rid, "chat.room_id": room_id, "chat.path": Path.BATCH.value},
        )  # fmt: skip
        call = trace.call("task")
        try:
            accepted = await self._tasks.submit(request, call.traceparent)
        except (UpstreamError, StoreError) as exc:
            call.end(exc)
            if isinstance(exc, UpstreamError):
                code, message, after_ms = exc.code, exc.message, exc.retry_after_ms
            else:
                code, message, after_ms = ErrorCode.BACKEND_UNAVAILABLE, STORE_BUSY, None
            trace.end(ok=False, attributes={"chat.code": code.value}, events={})
            return self._reject(ack, rid, code, message, after_ms)
        call.end()
        accepted_at = time.monotonic()
        self._metrics.ack.labels(path=Path.BATCH.value).observe(accepted_at - received_at)
        ack(payloads.accepted(rid, room_id, None, Path.BATCH, task_id=rid))
        if accepted.user_message is not None:
            event = {"roomId": room_id, "message": accepted.user_message.wire()}
            self.server.emit_local(room_id, ServerEvent.NEW_MESSAGE, event)
            self.server.spawn(self._publish_quietly(room_id, ServerEvent.NEW_MESSAGE, event))
        if accepted.status in (TaskState.DONE, TaskState.FAILED):
            # the same requestId again, for a task that has ended: its outcome comes again
            self.server.spawn(self._tasks.resent(sid, request.user_id, rid))
        trace.end(
            ok=True, attributes={"chat.result_path": Path.BATCH.value},
            events={"accepted": accepted_at},
        )  # fmt: skip
        log.info("task_accepted", status=accepted.status.value)

    async def _admit(self, sid: str, ident: Identity, room_id: str, content: str) -> int | None:
        """What every message to a room passes first (``send_message``, ``post_message``): its
        size, the room's rules (joining it), the user's rate limit. The retry delay in ms when
        over the limit, else None; raises ``ContractError`` / ``PayloadError`` / ``StoreError``."""
        check_content(content, self._settings.max_content_chars)
        await self._enter(sid, ident, room_id)
        return await self._rooms.rate_limited(ident.user_id)

    def _rate_limited(self, ack: AckFn, request_id: str, retry_after_ms: int) -> None:
        self._reject(
            ack, request_id, ErrorCode.RATE_LIMITED, "too many messages, slow down", retry_after_ms
        )

    async def _stream(self, sid: str, job: RelayJob, ack: AckFn, ticket: int = STREAM) -> None:
        req = job.request
        sink = RoomSink(server=self.server, rooms=self._rooms, sid=sid, request=req, ack=ack)
        relay = Relay(job, upstream=self._upstream, sink=sink, timeouts=self._settings.timeouts)
        key = (req.room_id, req.request_id)
        active = self._relays[key] = _Active(relay, sink)
        self._metrics.active.inc()
        try:
            outcome = await relay.run()
            self._record(outcome, job)
            self._judge(ticket, outcome)
        except Exception:
            log.exception("relay_crashed")
            self._breaker.record(ticket, good=False)
            job.trace.end(ok=False, attributes={"chat.code": ErrorCode.INTERNAL.value}, events={})
            await self._crashed(relay, sink)
        finally:
            self._metrics.active.dec()
            if self._relays.get(key) is active:
                del self._relays[key]
            await sink.finish()

    async def _crashed(self, relay: Relay, sink: RoomSink) -> None:
        """A bug in the relay still ends the request with the contract's events."""
        rid, room_id = relay.request_id, relay.room_id
        if not sink.acked:
            sink.ack(payloads.rejected(rid, ErrorCode.INTERNAL, "internal error"))
            return
        if not sink.terminal_sent:
            err = payloads.error(rid, room_id, relay.message_id, ErrorCode.INTERNAL, "internal")
            await sink.room("ai_message_error", err)
        if not sink.done_sent:  # after a terminal event the sender always gets message_ack
            sink.sender(
                "message_ack",
                payloads.message_ack(
                    rid, room_id, relay.message_id, ok=False, path=Path.STREAM,
                    code=ErrorCode.INTERNAL,
                ),
            )  # fmt: skip

    async def _complete(self, sid: str, job: RelayJob, ack: AckFn) -> None:
        accepted_at: float | None = None

        def timed_ack(payload: Payload) -> None:
            nonlocal accepted_at
            accepted_at = time.monotonic()
            self._metrics.ack.labels(path=Path.COMPLETE.value).observe(
                accepted_at - job.received_at
            )
            ack(payload)

        call = job.trace.call("complete")
        try:
            ok, code = await run_complete(
                server=self.server, rooms=self._rooms, upstream=self._upstream, sid=sid,
                request=job.request, ack=timed_ack, traceparent=call.traceparent,
                timeouts=self._settings.timeouts,
            )  # fmt: skip
        except Exception:
            log.exception("complete_crashed")
            ok, code = False, ErrorCode.INTERNAL
        call.end()
        elapsed = time.monotonic() - job.received_at
        job.trace.end(
            ok=ok,
            attributes={"chat.result_path": Path.COMPLETE.value, "chat.ok": ok,
                        **({"chat.code": code.value} if code is not None else {})},
            events={"accepted": accepted_at},
        )  # fmt: skip
        self._metrics.requests.labels(path=Path.COMPLETE.value, ok=str(ok).lower()).inc()
        self._metrics.completion.labels(path=Path.COMPLETE.value).observe(elapsed)
        if ok:
            # the complete path's first token arrives with the whole answer: its TTFT is its
            # completion, the figure the stream cohort's is compared with (bridge/gates.py)
            self._metrics.ttft.labels(path=Path.COMPLETE.value).observe(elapsed)
        if code is not None:
            self._metrics.errors.labels(code=code.value).inc()
        log.info("request_done", ok=ok, code=code, total_ms=round(elapsed * 1000, 1))

    def _judge(self, ticket: int, outcome: Outcome) -> None:
        """Tell the breaker how this stream-path request went (CONTRACT.md section 5)."""
        good = verdict(
            ok=outcome.ok, fell_back=outcome.path is Path.FALLBACK, code=outcome.code,
            rejected=outcome.rejected,
        )  # fmt: skip
        if good is None:
            self._breaker.forget(ticket)
        else:
            self._breaker.record(ticket, good=good)

    def _record(self, outcome: Outcome, job: RelayJob) -> None:
        m = self._metrics
        if outcome.rejected:
            m.rejections.labels(code=str(outcome.code)).inc()
            if outcome.code not in NOT_COUNTED:
                # refused by the backend before any ack for a reason of the stream path's (it
                # was down, ...): a failed send for the rollout's gate, as for the breaker
                m.requests.labels(path=outcome.path.value, ok="false").inc()
        else:
            m.requests.labels(path=outcome.path.value, ok=str(outcome.ok).lower()).inc()
            if outcome.accepted_ms is not None:
                m.ack.labels(path=outcome.path.value).observe(outcome.accepted_ms / 1000.0)
        for kind in outcome.faults:
            m.relay_faults.labels(kind=kind).inc()
        if not outcome.ok and "gap" in outcome.faults:
            # a seq gap that neither a resume nor the fallback repaired (a rollout gate)
            m.relay_faults.labels(kind=GAP_UNREPAIRED).inc()
        if outcome.first_chunk_ms is not None:
            m.ttft.labels(path=outcome.path.value).observe(outcome.first_chunk_ms / 1000.0)
        if outcome.total_ms is not None and not outcome.rejected:
            m.completion.labels(path=outcome.path.value).observe(outcome.total_ms / 1000.0)
        if outcome.path is Path.FALLBACK:
            m.fallbacks.labels(reason=outcome.reason.split(":")[-1]).inc()
        if outcome.code is not None and not outcome.rejected:
            m.errors.labels(code=outcome.code.value).inc()
        if outcome.resumes:
            m.resumes.inc(outcome.resumes)
        if outcome.duplicates:
            m.duplicates.inc(outcome.duplicates)
            m.relay_faults.labels(kind="duplicate").inc(outcome.duplicates)
        self._end_trace(outcome, job)
        log.info(
            "request_done", ok=outcome.ok, result_path=outcome.path.value, reason=outcome.reason,
            code=outcome.code, resumes=outcome.resumes, duplicates=outcome.duplicates,
            accepted_ms=outcome.accepted_ms, first_chunk_ms=outcome.first_chunk_ms,
            total_ms=outcome.total_ms,
        )  # fmt: skip

    @staticmethod
    def _end_trace(outcome: Outcome, job: RelayJob) -> None:
        def at(ms: float | None) -> float | None:
            return None if ms is None else job.received_at + ms / 1000.0

        attributes: dict[str, AttributeValue] = {
            "chat.result_path": outcome.path.value, "chat.ok": outcome.ok,
            "chat.reason": outcome.reason, "chat.resumes": outcome.resumes,
        }  # fmt: skip
        if outcome.code is not None:
            attributes["chat.code"] = outcome.code.value
        job.trace.end(
            ok=outcome.ok,
            attributes=attributes,
            events={"accepted": at(outcome.accepted_ms), "first_chunk": at(outcome.first_chunk_ms)},
        )

    # ---- person-to-person messages ---------------------------------------------------------

    async def post_message(self, sid: str, data: object, ack: AckFn) -> None:
        """A message to the people in the room (no AI): stored by the backend in order with the
        AI exchanges, then ``new_message`` to the room; rate limited like ``send_message``."""
        request_id: str | None = None
        try:
            ident = self._identity(sid)
            msg = self._parse(PostMessage, data)
            request_id = msg.request_id or uuid.uuid4().hex
            retry_after_ms = await self._admit(sid, ident, msg.room_id, msg.content)
            if retry_after_ms is not None:
                return self._rate_limited(ack, request_id, retry_after_ms)
            post = PostRequest(request_id=request_id, user_id=ident.user_id, content=msg.content)
            stored = await self._upstream.post_message(msg.room_id, post, random_traceparent())
        except (ContractError, PayloadError) as exc:
            return self._reject(ack, request_id, exc.code, exc.message)
        except StoreError:
            return self._reject(ack, request_id, ErrorCode.BACKEND_UNAVAILABLE, STORE_BUSY)
        except UpstreamError as exc:
            return self._reject(ack, request_id, exc.code, exc.message, exc.retry_after_ms)
        event = stored.wire()
        self.server.emit_local(msg.room_id, ServerEvent.NEW_MESSAGE, event)
        self.server.spawn(self._publish_quietly(msg.room_id, ServerEvent.NEW_MESSAGE, event))
        ack({"ok": True, "requestId": request_id, "roomId": msg.room_id,
             "messageId": stored.message.id})  # fmt: skip

    # ---- members ---------------------------------------------------------------------------

    async def add_member(self, sid: str, data: object, ack: AckFn) -> None:
        await self._change_member(sid, data, ack, add=True)

    async def remove_member(self, sid: str, data: object, ack: AckFn) -> None:
        await self._change_member(sid, data, ack, add=False)

    async def _change_member(self, sid: str, data: object, ack: AckFn, *, add: bool) -> None:
        """The owner adds or removes a member (CONTRACT.md "Rooms and members"); a removed
        member's sockets leave the room on every replica before anything else reaches them."""
        try:
            ident = self._identity(sid)
            msg = self._parse(ChangeMember, data)
            room_id = msg.room_id
            if add and await self._rooms.member_count(room_id) >= MAX_MEMBERS:
                raise PayloadError(ErrorCode.RATE_LIMITED, f"a room has at most {MAX_MEMBERS}")
            members = await self._rooms.change_member(room_id, ident.user_id, msg.user_id, add=add)
            if members is None:
                raise PayloadError(ErrorCode.FORBIDDEN, "only the room's owner changes members")
            kind = RoomEventType.MEMBER_ADDED if add else RoomEventType.MEMBER_REMOVED
            event = payloads.room_event(room_id, kind, msg.user_id)
            self.server.emit_local(room_id, ServerEvent.ROOM_EVENT, event)
            await self.server.publish(room_id, ServerEvent.ROOM_EVENT, event)
            if not add:
                await self.server.control(room_id, MEMBER_REMOVED_CONTROL, {"userId": msg.user_id})
        except PayloadError as exc:
            return self._refuse(ack, exc.code, exc.message)
        except (StoreError, RedisError, OSError):
            return self._refuse(ack, ErrorCode.BACKEND_UNAVAILABLE, STORE_BUSY)
        ack(payloads.members_ack(room_id, members))

    def _member_removed(self, room_id: str, payload: Payload) -> None:
        """On every replica: the removed user's local sockets leave the room now."""
        user_id = payload.get("userId")
        for sid in self.server.local_sids(room_id):
            ident = self._identities.get(sid)
            if ident is not None and ident.user_id == user_id:
                self.server.leave_room_now(sid, room_id)
                self.server.spawn(self._depart(room_id, ident.user_id))

    # ---- client timings -------------------------------------------------------------------

    def _expect_timing(self, sid: str, request_id: str) -> None:
        due = self._timing_due.get(sid)
        if due is None:
            due = self._timing_due[sid] = OrderedDict()
        due[request_id] = None
        while len(due) > MAX_TIMINGS_DUE_PER_SOCKET:
            due.popitem(last=False)

    async def client_timing(self, sid: str, data: object, ack: AckFn) -> None:
        """A page's own P0 timings of a request it sent: one sample per request, else dropped."""
        try:
            timing = self._parse(ClientTiming, data)
        except PayloadError as exc:
            return self._refuse(ack, exc.code, exc.message)
        due = self._timing_due.get(sid)
        if due is None or due.pop(timing.request_id, False) is False:
            return self._refuse(ack, ErrorCode.NOT_FOUND, "no request of this socket to time")
        if timing.first_chunk_ms is not None:
            self._metrics.client_ttft.observe(timing.first_chunk_ms / 1000.0)
        ack({"ok": True})

    async def cancel_message(self, sid: str, data: object, ack: AckFn) -> None:
        try:
            ident = self._identity(sid)
            msg = self._parse(CancelMessage, data)
        except PayloadError as exc:
            return self._refuse(ack, exc.code, exc.message)
        structlog.contextvars.bind_contextvars(requestId=msg.request_id, userId=ident.user_id)
        try:
            await self._upstream.cancel(msg.request_id, ident.user_id, random_traceparent())
        except UpstreamHttpError as exc:
            return self._refuse(ack, exc.code, exc.message)
        except UpstreamError as exc:
            return self._refuse(ack, exc.code, "backend unavailable")
        log.info("cancel_requested")
        ack({"ok": True})

    # ---- helpers --------------------------------------------------------------------------

    def _identity(self, sid: str) -> Identity:
        ident = self._identities.get(sid)
        if ident is None:
            raise PayloadError(ErrorCode.UNAUTHORIZED, "not authenticated")
        return ident

    @staticmethod
    def _parse(model: type[M], data: object) -> M:
        try:
            return parse(model, data)
        except ContractError as exc:
            raise PayloadError.from_contract(exc) from None

    def _refuse(self, ack: AckFn, code: ErrorCode, message: str) -> None:
        self._metrics.rejections.labels(code=code.value).inc()
        ack(payloads.error_ack(code, message))

    def _reject(
        self,
        ack: AckFn,
        request_id: str | None,
        code: ErrorCode,
        message: str,
        retry_after_ms: int | None = None,
    ) -> None:
        self._metrics.rejections.labels(code=code.value).inc()
        log.info("send_rejected", code=code.value, requestId=request_id)
        ack(payloads.rejected(request_id, code, message, retry_after_ms))
