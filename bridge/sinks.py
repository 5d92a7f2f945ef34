"""Where relayed events go: the room sink of a relay, the complete path, and replay followers.

- ``RoomSink`` is the relay's ``EventSink`` on a real server: local sockets first (directly),
  then the Redis queue only when another replica had members of the room as the generation
  began. Presence is read once, in the same round trip that records the generation in flight
  (``RoomRegistry.begin``), and never again: a socket that joins another replica later is
  replayed and followed live by that replica's ``follow`` (Redis orders the two: either the
  joiner's presence is written before ``begin`` reads it, or ``begin``'s in-flight record is
  written before the joiner reads it). A re-check per relay per second used to cost 11 % of
  the CPU at 1,000 streams (issue 8) for events the follower's socket drops anyway (its
  delivery filter holds live events back while it is followed). Publishes go through one
  ordered outbox task per relay, so the relay never waits on Redis per chunk: under overload
  a slow Redis made every chunk (and the sender's acks behind them) wait.
- ``run_complete`` is the old behaviour for users the flag keeps off streaming.
- ``follow`` replays a generation running elsewhere to one joining socket, from the backend's
  resume endpoint (any replica can serve it), then follows it live to its terminal event.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog

from bridge import payloads
from bridge.errors import StoreError, UpstreamError, UpstreamHttpError
from bridge.fanout import CHUNK, START, TERMINAL
from bridge.payloads import Payload
from bridge.rooms import InFlight, RoomRegistry
from bridge.settings import Timeouts
from bridge.sio import AckFn, SocketServer
from bridge.upstream import Chunk, End, Failed, Start, Upstream, UpstreamStream
from contracts import ChatRequest, ErrorCode, Path

log = structlog.get_logger("bridge.sinks")

DONE = "message_ack"
# Publishes a relay may have queued for other replicas; past it they are dropped (and logged):
# the remote sockets' delivery filter then drops the later chunks and ai_message_end still
# carries the whole content.
MAX_PENDING_PUBLISHES = 1000
PUBLISH_TIMEOUT_S = 5.0
OUTBOX_IDLE_S = 60.0


class RoomSink:
    """``EventSink`` of one relay on a live server."""

    def __init__(
        self,
        *,
        server: SocketServer,
        rooms: RoomRegistry,
        sid: str,
        request: ChatRequest,
        ack: AckFn,
    ) -> None:
        self._server = server
        self._rooms = rooms
        self._sid = sid
        self._request = request
        self._ack = ack
        self.remote = False
        self.acked = False
        self.began = False
        self.terminal_sent = False
        self.done_sent = False
        self._outbox: asyncio.Queue[tuple[str, Payload]] | None = None
        self._dropped = 0

    def ack(self, payload: Payload) -> None:
        self.acked = True
        self._ack(payload)

    async def begin(self, message_id: str) -> None:
        req = self._request
        try:
            self.remote = await self._rooms.begin(
                req.room_id, req.request_id, req.user_id, message_id
            )
        except StoreError:
            log.warning("presence_unknown_publishing")
            self.remote = True  # unknown: the queue is the safe choice
        self.began = True

    async def room(self, event: str, payload: Payload) -> None:
        room_id = self._request.room_id
        self._server.emit_local(room_id, event, payload)
        if event in TERMINAL:
            self.terminal_sent = True
        if self.remote:
            self._publish(event, payload)

    def _publish(self, event: str, payload: Payload) -> None:
        """Queue an event for the other replicas; one task sends them in order."""
        if self._outbox is None:
            self._outbox = asyncio.Queue()
            self._server.spawn(self._drain(self._outbox))
        if self._outbox.qsize() >= MAX_PENDING_PUBLISHES:
            self._dropped += 1
            if self._dropped == 1:
                log.warning("publish_backlog_dropping", bound=MAX_PENDING_PUBLISHES)
            return
        self._outbox.put_nowait((event, payload))

    async def _drain(self, outbox: asyncio.Queue[tuple[str, Payload]]) -> None:
        room_id = self._request.room_id
        while True:
            try:
                event, payload = await asyncio.wait_for(outbox.get(), OUTBOX_IDLE_S)
            except TimeoutError:
                return  # the relay ended without a terminal (it crashed): nothing more comes
            try:
                await asyncio.wait_for(
                    self._server.publish(room_id, event, payload), PUBLISH_TIMEOUT_S
                )
            except Exception as exc:  # loop edge: a lost publish, later ones still go
                log.warning("publish_failed", event=event, error=type(exc).__name__)
            if event in TERMINAL:
                return

    def sender(self, event: str, payload: Payload) -> None:
        if event == DONE:
            self.done_sent = True
        self._server.emit_to(self._sid, event, payload)

    async def finish(self) -> None:
        if not self.began:
            return
        try:
            await self._rooms.finish(self._request.room_id, self._request.request_id)
        except StoreError:
            log.warning("inflight_not_cleared")


async def run_complete(
    *,
    server: SocketServer,
    rooms: RoomRegistry,
    upstream: Upstream,
    sid: str,
    request: ChatRequest,
    ack: AckFn,
    traceparent: str,
    timeouts: Timeouts,
) -> tuple[bool, ErrorCode | None]:
    """The complete path (CONTRACT.md section 1): ack, user and assistant ``new_message``, done."""
    rid, room_id = request.request_id, request.room_id
    ack(payloads.accepted(rid, room_id, None, Path.COMPLETE))
    try:
        remote = await rooms.has_remote_members(room_id)
    except StoreError:
        remote = True
    try:
        body = await upstream.complete(request, traceparent, timeouts.total_s)
    except UpstreamError as exc:
        ack_payload = payloads.message_ack(
            rid, room_id, None, ok=False, path=Path.COMPLETE, code=exc.code
        )
        server.emit_to(sid, "message_ack", ack_payload)
        return False, exc.code
    user = payloads.new_message(
        room_id=room_id, message_id=body.user_message_id, request_id=rid, role="user",
        content=request.content, user_id=request.user_id, character_id=request.character_id,
    )  # fmt: skip
    reply = payloads.new_message(
        room_id=room_id, message_id=body.message_id, request_id=rid, role="assistant",
        content=body.content, user_id=None, character_id=request.character_id,
    )  # fmt: skip
    for message in (user, reply):
        server.emit_local(room_id, "new_message", message)
        if remote:
            await server.publish(room_id, "new_message", message)
    done = payloads.message_ack(rid, room_id, body.message_id, ok=True, path=Path.COMPLETE)
    server.emit_to(sid, "message_ack", done)
    return True, None


@dataclass
class _Followed:
    expected: int = 0
    announced: bool = False


async def follow(
    *,
    server: SocketServer,
    upstream: Upstream,
    sid: str,
    room_id: str,
    item: InFlight,
    traceparent: str,
    timeouts: Timeouts,
) -> None:
    """Replay ``item`` to socket ``sid`` from the backend, then follow it live to its end."""
    server.filter.follow(sid, item.message_id)
    state = _Followed()
    try:
        for _attempt in range(timeouts.max_resumes + 1):
            last_seq = state.expected - 1 if state.announced and state.expected else None
            try:
                stream = await upstream.resume(item.request_id, item.user_id, last_seq, traceparent)
            except UpstreamHttpError as exc:
                if exc.status == 404:
                    return
                continue
            except UpstreamError:
                continue
            try:
                if await _follow_stream(server, stream, sid, room_id, item, state, timeouts):
                    return
            except (UpstreamError, TimeoutError):
                pass
            finally:
                await stream.aclose()
    finally:
        server.filter.unfollow(sid, item.message_id)


async def _follow_stream(
    server: SocketServer,
    stream: UpstreamStream,
    sid: str,
    room_id: str,
    item: InFlight,
    state: _Followed,
    timeouts: Timeouts,
) -> bool:
    """Relay one resumed stream to ``sid``; ``True`` once the generation is over for it."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout_at(loop.time() + timeouts.first_chunk_s) as timer:
        async for event in stream.events():
            if not server.in_room(sid, room_id):
                return True  # it left the room, or was removed from it: nothing more for it
            if type(event) is Start and not state.announced:
                state.announced = True
                start = payloads.start(
                    item.request_id, room_id, event.message_id, event.queue_position
                )
                server.emit_to(sid, START, start, follower=True)
            elif type(event) is Chunk and state.announced and event.seq == state.expected:
                state.expected += 1
                chunk = payloads.chunk(
                    item.request_id, room_id, item.message_id, event.seq, event.text
                )
                server.emit_to(sid, CHUNK, chunk, follower=True)
            elif type(event) is Failed and event.body.retryable:
                return True  # the relay falls back; its result reaches the room live
            elif type(event) in (End, Failed) and state.announced:
                server.emit_to(sid, *_terminal(event, item, room_id), follower=True)
                return True
            wait = timeouts.idle_s
            if type(event) is Start and event.queue_position:
                wait = timeouts.first_chunk_s + timeouts.queue_wait_s  # waits for its room
            timer.reschedule(loop.time() + wait)
    return False


def _terminal(event: Any, item: InFlight, room_id: str) -> tuple[str, Payload]:
    if type(event) is End:
        timing = payloads.latency(
            accepted_ms=None, first_chunk_ms=None, total_ms=None, backend=event.body.latency
        )
        end = payloads.end(item.request_id, room_id, event.body, timing)
        end["messageId"] = item.message_id
        return "ai_message_end", end
    body = event.body
    err = payloads.error(
        item.request_id, room_id, item.message_id, body.code, body.message,
        retryable=body.retryable,
    )  # fmt: skip
    return "ai_message_error", err
