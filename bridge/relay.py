"""The relay state machine of one ``send_message`` on the stream path.

ARCHITECTURE.md "The relay", steps 3-6, and CONTRACT.md section 1 "Ordering and delivery":

    open stream --start--> ack accepted, new_message, ai_message_start
        --chunk seq==next--> ai_message_chunk       (seq < next: duplicate, dropped)
        --chunk seq>next / cut / idle timeout--> resume with Last-Event-ID (bounded)
        --end--> ai_message_end, message_ack ok
        --error event (retryable) / cannot open / cannot resume / no first chunk--> fallback
    fallback: POST /chat/messages, same requestId -> the unseen suffix as one more chunk (or
        only the authoritative content in ai_message_end) -> message_ack ok, path "fallback"
    both failed: ai_message_error + message_ack ok=false

The relay talks to the world only through ``Upstream`` and ``EventSink`` (Protocols), so
tests/bridge/test_relay.py drives it without sockets or HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from bridge import payloads
from bridge.errors import (
    SeqGap,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamFailed,
    UpstreamHttpError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from bridge.payloads import Payload
from bridge.settings import Timeouts
from bridge.tracing import CallSpan, RequestTrace
from bridge.upstream import Chunk, End, Failed, Start, Upstream, UpstreamEvent, UpstreamStream
from contracts import ChatRequest, CompleteResponse, ErrorCode, FinishReason, Path, StreamEnd

log = structlog.get_logger("bridge.relay")

USER_ROLE = "user"
TIMER_SLACK_S = 1.0


class EventSink(Protocol):
    """Where one relay's events go (the sender's socket, the room, the in-flight registry)."""

    def ack(self, payload: Payload) -> None:
        """The ``send_message`` ack; the relay calls it exactly once."""

    async def begin(self, message_id: str) -> None:
        """The generation has a message id; called before the first room event."""

    async def room(self, event: str, payload: Payload) -> None:
        """An event for every socket in the room (on every replica)."""

    def sender(self, event: str, payload: Payload) -> None:
        """An event for the sender's socket only."""


CONTENT_MISMATCH = "content_mismatch"
GAP_UNREPAIRED = "gap_unrepaired"
_WHOLE = frozenset({FinishReason.STOP, FinishReason.LENGTH})


def fault_kind(exc: UpstreamError) -> str:
    """The ``bridge_relay_faults_total{kind}`` label of a broken stream."""
    if isinstance(exc, SeqGap):
        return "gap"
    if isinstance(exc, UpstreamFailed):
        return "error_event"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamDisconnected):
        return "cut"
    if isinstance(exc, UpstreamProtocolError):
        return "protocol"
    return "other"


@dataclass(frozen=True, kw_only=True)
class RelayJob:
    request: ChatRequest
    received_at: float
    fallback: bool
    trace: RequestTrace = field(default_factory=RequestTrace.off)


@dataclass(frozen=True, kw_only=True)
class Outcome:
    path: Path
    ok: bool
    code: ErrorCode | None = None
    reason: str = "end"
    resumes: int = 0
    duplicates: int = 0
    accepted_ms: float | None = None
    first_chunk_ms: float | None = None
    total_ms: float | None = None
    rejected: bool = False
    faults: tuple[str, ...] = ()


class Relay:
    """Relays one generation from the backend's SSE stream to a room."""

    def __init__(
        self,
        job: RelayJob,
        *,
        upstream: Upstream,
        sink: EventSink,
        timeouts: Timeouts,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self._upstream = upstream
        self._sink = sink
        self._timeouts = timeouts
        self._clock = clock
        self._deadline = job.received_at + timeouts.total_s
        req = job.request
        self.request_id, self.room_id = req.request_id, req.room_id
        self.message_id: str | None = None
        self.parts: list[str] = []  # chunk text by seq: the room has seen exactly these
        self.started = False
        self.announced = False  # ai_message_start went to the room: a joiner can be replayed
        self._user_announced = False  # the user's new_message went to the room
        self._accepted_at: float | None = None
        self._first_chunk_at: float | None = None
        self.queue_position = 0  # > 0 at start: the generation waited for its room
        self._resumes = 0
        self._duplicates = 0
        self.faults: list[str] = []  # one kind per broken stream (bridge_relay_faults_total)
        self._path = Path.STREAM

    @property
    def next_seq(self) -> int:
        return len(self.parts)

    async def run(self) -> Outcome:
        """Drive the generation to exactly one terminal event; never raises an UpstreamError."""
        call = self.job.trace.call("stream")
        try:
            # Bounded from the receipt of send_message, not from here: the ack waits on this
            # (plus whatever the handler's Redis round trips took under load); past the budget
            # the fallback is sent and acked instead (issue 3: acks later than 10 s).
            async with asyncio.timeout(self._open_budget_s()):
                stream = await self._upstream.open_stream(self.job.request, call.traceparent)
        except TimeoutError as exc:
            call.end(exc)
            return await self._fallback(UpstreamTimeout("open stream: timed out"), "open_failed")
        except UpstreamHttpError as exc:
            call.end(exc)
            if exc.refused:
                return self._reject(exc)
            return await self._fallback(exc, "open_failed")
        except UpstreamError as exc:
            call.end(exc)
            return await self._fallback(exc, "open_failed")
        except BaseException as exc:
            call.end(exc)
            raise
        while True:
            broken: UpstreamError | None = None
            try:
                return await self._pump(stream)
            except UpstreamError as exc:
                broken = exc
            finally:
                await stream.aclose()
                call.end(broken)
            self.faults.append(fault_kind(broken))
            reason = self._unresumable(broken)
            if reason is not None:
                return await self._fallback(broken, reason)
            resumed = await self._resume(broken)
            if resumed is None:
                return await self._fallback(broken, "resume_failed")
            stream, call = resumed

    # ---- stream ---------------------------------------------------------------------------

    async def _pump(self, stream: UpstreamStream) -> Outcome:
        loop = asyncio.get_running_loop()
        end: StreamEnd | None = None
        try:
            async with asyncio.timeout_at(loop.time() + self._wait_s()) as timer:
                async for event in stream.events():
                    if type(event) is Chunk:
                        # A chunk's handling never suspends (the room's side queues, it does
                        # not wait), so the timer cannot fire in it. The timer is armed
                        # ``TIMER_SLACK_S`` past the wait and re-armed only when a chunk's wait
                        # would end after it: once a second per stream instead of per chunk
                        # (re-arming per event cost 3-8 % of the CPU at 1,000 streams, issue 8).
                        # The idle timeout so fires up to the slack late, never early; the
                        # total timeout is exact (no slack when it is what ends the wait).
                        await self._handle(event)
                        wait = self._wait_s()
                        due = loop.time() + wait
                        armed = due + self._slack_s(wait)
                        when = timer.when()
                        if when is None or not due <= when <= armed:  # early, or too late
                            timer.reschedule(armed)
                        continue
                    # The timer bounds the wait on the backend only. Handling any other event
                    # awaits the room's side (Redis: the in-flight record), which under load
                    # takes seconds; a timer expiring there cancelled ``_start`` half-way (the
                    # relay "started" but the room never got ``ai_message_start``, so the
                    # fallback's chunks and terminal were dropped by the delivery filter), or,
                    # when the cancellation was swallowed below, crashed the relay on
                    # ``reschedule`` ("Cannot change state of expiring Timeout"). No await
                    # since the event arrived: the timer cannot be expiring here.
                    timer.reschedule(None)
                    end = await self._handle(event)
                    if end is not None:
                        break
                    timer.reschedule(loop.time() + self._wait_s())
        except TimeoutError:
            raise UpstreamTimeout("no event within the wait") from None
        if end is None:
            raise UpstreamDisconnected("stream ended early")
        # Outside the wait: the terminal event and the sender's message_ack are not waits on
        # the backend, and a timer firing between them left a terminal without its message_ack.
        return await self._end(end)

    async def _handle(self, event: UpstreamEvent) -> StreamEnd | None:
        if type(event) is Chunk:
            if event.seq < len(self.parts):
                self._duplicates += 1
                return None
            if event.seq > len(self.parts):
                raise SeqGap(f"expected seq {len(self.parts)}, got {event.seq}")
            await self._chunk(event.text)
        elif type(event) is Start:
            if event.queue_position and not self.queue_position and not self.parts:
                # Queued behind the room's earlier generations (the backend's per-room lock):
                # the stream is pinged meanwhile, and the waits allow for the queue.
                self.queue_position = event.queue_position
                self._deadline += self._timeouts.queue_wait_s
            await self._start(event.message_id, event.user_message_id)
        elif type(event) is End:
            if not self.started:
                raise UpstreamProtocolError("end before start")
            return event.body
        elif type(event) is Failed:
            body = event.body
            raise UpstreamFailed(body.code, body.message, retryable=body.retryable)
        return None

    def _open_budget_s(self) -> float:
        budget = self._timeouts.connect_s + self._timeouts.first_event_s
        return max(0.0, min(self.job.received_at + budget, self._deadline) - self._clock())

    def _wait_s(self) -> float:
        if not self.started:
            wait = self._timeouts.first_event_s
        elif not self.parts:
            wait = self._timeouts.first_chunk_s
            if self.queue_position:
                wait += self._timeouts.queue_wait_s
        else:
            wait = self._timeouts.idle_s
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise UpstreamTimeout("total timeout")
        return min(wait, remaining)

    def _slack_s(self, wait_s: float) -> float:
        """The timer's slack past a wait of ``wait_s``: none when the total deadline ends it."""
        return TIMER_SLACK_S if wait_s < self._deadline - self._clock() else 0.0

    async def _start(self, message_id: str, user_message_id: str) -> None:
        if self.announced:
            if message_id != self.message_id:
                raise UpstreamProtocolError("resumed stream names another message")
            return
        # Not announced yet (first start, or one interrupted before ai_message_start): the
        # room has seen nothing of this generation, so (re)do every step still missing.
        self.message_id = message_id
        self.started = True
        # The ack first: it waits on the backend's start only, not on the in-flight record's
        # Redis round trip (seconds under load); begin still precedes every room event.
        self._accept(message_id)
        await self._sink.begin(message_id)
        if not self._user_announced:
            self._user_announced = True
            await self._sink.room("new_message", self._user_message(user_message_id))
        # Set before the emit: the room's local sockets get the start in the same step (no await
        # in between), so a socket replayed from this relay never misses it.
        self.announced = True
        await self._sink.room(
            "ai_message_start",
            payloads.start(self.request_id, self.room_id, message_id, self.queue_position),
        )

    async def _chunk(self, text: str) -> None:
        if self.message_id is None:
            raise UpstreamProtocolError("chunk before start")
        if self._first_chunk_at is None:
            self._first_chunk_at = self._clock()
        seq = len(self.parts)
        self.parts.append(text)
        await self._sink.room(
            "ai_message_chunk",
            payloads.chunk(self.request_id, self.room_id, self.message_id, seq, text),
        )

    async def _end(self, body: StreamEnd | CompleteResponse) -> Outcome:
        assert self.message_id is not None
        total_ms = self._ms(self._clock())
        timing = payloads.latency(
            accepted_ms=self._ms(self._accepted_at),
            first_chunk_ms=self._ms(self._first_chunk_at),
            total_ms=total_ms,
            backend=body.latency,
        )
        end = payloads.end(self.request_id, self.room_id, body, timing)
        end["messageId"] = self.message_id
        if (
            self._path is Path.STREAM
            and body.finish_reason in _WHOLE
            and body.content != "".join(self.parts)
        ):
            # the end's content is authoritative and corrects every client, but the room saw
            # chunks that did not add up to it: a relay fault the rollout's gate counts
            self.faults.append(CONTENT_MISMATCH)
        await self._sink.room("ai_message_end", end)
        self._sink.sender(
            "message_ack",
            payloads.message_ack(
                self.request_id, self.room_id, self.message_id, ok=True, path=self._path
            ),
        )
        return self._outcome(ok=True, reason="end" if self._path is Path.STREAM else "fallback")

    # ---- resume and fallback --------------------------------------------------------------

    def _unresumable(self, exc: UpstreamError) -> str | None:
        """Why a broken stream goes straight to the fallback (``None``: try to resume)."""
        if not self.announced:
            return "no_start"
        if isinstance(exc, UpstreamFailed):
            return "error_event"
        if isinstance(exc, UpstreamTimeout) and not self.parts:
            return "first_chunk_timeout"
        if self._clock() >= self._deadline:
            return "total_timeout"
        return None

    async def _resume(self, broken: UpstreamError) -> tuple[UpstreamStream, CallSpan] | None:
        resume_deadline = min(self._clock() + self._timeouts.resume_s, self._deadline)
        while self._resumes < self._timeouts.max_resumes and self._clock() < resume_deadline:
            self._resumes += 1
            last_seq = len(self.parts) - 1 if self.parts else None
            log.info("relay_resume", reason=type(broken).__name__, last_seq=last_seq)
            call = self.job.trace.call("resume")
            try:
                stream = await self._upstream.resume(
                    self.request_id, self.job.request.user_id, last_seq, call.traceparent
                )
            except UpstreamHttpError as exc:
                call.end(exc)
                if exc.status == 404:
                    return None
                broken = exc
            except BaseException as exc:
                call.end(exc)
                if not isinstance(exc, UpstreamError):
                    raise
                broken = exc
            else:
                return stream, call
        return None

    async def _fallback(self, cause: UpstreamError, reason: str) -> Outcome:
        if isinstance(cause, UpstreamFailed) and not cause.retryable:
            return await self._fail(cause, reason)
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            return await self._fail(UpstreamTimeout(cause.message), reason)
        if not self.job.fallback:
            return await self._fail(cause, reason)
        log.info("relay_fallback", reason=reason, cause=type(cause).__name__)
        self._path = Path.FALLBACK
        self._accept(self.message_id)  # "or when the fallback request was sent"
        call = self.job.trace.call("fallback")
        try:
            body = await self._upstream.complete(self.job.request, call.traceparent, remaining)
        except BaseException as exc:
            call.end(exc)
            if not isinstance(exc, UpstreamError):
                raise
            log.info("relay_fallback_failed", cause=type(exc).__name__)
            return await self._fail(cause, reason)
        call.end()
        if not self.announced:
            await self._start(body.message_id, body.user_message_id)
        seen = "".join(self.parts)
        if body.content.startswith(seen) and len(body.content) > len(seen):
            await self._chunk(body.content[len(seen) :])
        outcome = await self._end(body)
        return Outcome(**{**outcome.__dict__, "reason": f"fallback:{reason}"})

    async def _fail(self, cause: UpstreamError, reason: str) -> Outcome:
        """Both paths failed: the room is told ``cause`` (the first failure), in the backend's
        words where the backend reported it (``retryable``, ``Retry-After``)."""
        if self._accepted_at is None:
            return self._reject(cause)
        code = cause.code
        await self._sink.room(
            "ai_message_error",
            payloads.error(
                self.request_id, self.room_id, self.message_id, code, cause.message,
                retryable=cause.retryable, retry_after_ms=cause.retry_after_ms,
            ),
        )  # fmt: skip
        self._sink.sender(
            "message_ack",
            payloads.message_ack(
                self.request_id, self.room_id, self.message_id, ok=False, path=self._path,
                code=code,
            ),
        )  # fmt: skip
        return self._outcome(ok=False, code=code, reason=f"failed:{reason}")

    # ---- helpers --------------------------------------------------------------------------

    def _accept(self, message_id: str | None) -> None:
        if self._accepted_at is not None:
            return
        self._accepted_at = self._clock()
        self._sink.ack(payloads.accepted(self.request_id, self.room_id, message_id, Path.STREAM))

    def _reject(self, cause: UpstreamError) -> Outcome:
        self._accepted_at = self._clock()
        self._sink.ack(
            payloads.rejected(self.request_id, cause.code, cause.message, cause.retry_after_ms)
        )
        return self._outcome(ok=False, code=cause.code, reason="rejected", rejected=True)

    def _user_message(self, user_message_id: str) -> Payload:
        req = self.job.request
        return payloads.new_message(
            room_id=self.room_id,
            message_id=user_message_id,
            request_id=self.request_id,
            role=USER_ROLE,
            content=req.content,
            user_id=req.user_id,
            character_id=req.character_id,
        )

    def _ms(self, at: float | None) -> float | None:
        return None if at is None else round((at - self.job.received_at) * 1000.0, 3)

    def _outcome(
        self, *, ok: bool, reason: str, code: ErrorCode | None = None, rejected: bool = False
    ) -> Outcome:
        return Outcome(
            path=self._path,
            ok=ok,
            code=code,
            reason=reason,
            resumes=self._resumes,
            duplicates=self._duplicates,
            accepted_ms=self._ms(self._accepted_at),
            first_chunk_ms=self._ms(self._first_chunk_at),
            total_ms=self._ms(self._clock()),
            rejected=rejected,
            faults=tuple(self.faults),
        )
