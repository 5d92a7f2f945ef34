"""One generation's in-process state and its fan-out to the listeners of this process.

Listeners in the generating process read ``events`` by index and wait on a
"changed" event that is swapped on every publish: a listener takes the current event *before*
looking at the state, with no ``await`` in between, so it can never miss a publish nor see a
chunk twice (one event loop, no threads). Listeners elsewhere read the Redis Stream instead
(``listeners.py``). The object lives only while the generation runs; the registry drops it once
the terminal entry is in Redis, so nothing here grows past one reply.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from backend_stream.errors import BackendStreamError, RequestRejected
from backend_stream.store import GenKey, RoomPlace
from contracts import ErrorCode, SseEvent, StreamStart

PING_FRAME = b": ping\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE event, framed once and shared by every listener."""

    kind: SseEvent
    frame: bytes
    payload: dict[str, Any] | None = None  # start / end / error data, for non-SSE consumers
    retry_after_s: float | None = None  # error events of a rate-limited model

    def as_error(self) -> RequestRejected:
        """This error event as the HTTP refusal of a request that had no stream yet."""
        data = self.payload or {}
        try:
            code = ErrorCode(str(data.get("code")))
        except ValueError:
            code = ErrorCode.INTERNAL
        retryable = data.get("retryable")
        return RequestRejected(
            code,
            str(data.get("message", "generation failed")),
            retry_after_s=self.retry_after_s,
            retryable=retryable if isinstance(retryable, bool) else None,
        )


def frame(kind: SseEvent, data: bytes, event_id: int | None = None) -> bytes:
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return head + b"event: " + kind.value.encode() + b"\ndata: " + data + b"\n\n"


def chunk_event(seq: int, text: str) -> Event:
    data = orjson.dumps({"seq": seq, "chunk": text})
    return Event(SseEvent.CHUNK, frame(SseEvent.CHUNK, data, seq))


def payload_event(
    kind: SseEvent, payload: dict[str, Any], retry_after_s: float | None = None
) -> Event:
    return Event(kind, frame(kind, orjson.dumps(payload)), payload, retry_after_s)


def start_event(start: StreamStart) -> Event:
    payload = start.wire()
    if not start.queue_position:
        del payload["queuePosition"]  # optional on the wire: only a waiting generation has it
    return payload_event(SseEvent.START, payload)


@dataclass(eq=False)
class Generation:
    """A running generation as its own process sees it."""

    key: GenKey
    attempt: int
    start: StreamStart
    received_at: float  # time.monotonic() when the starting request arrived
    character_id: str | None = None
    chunks: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    terminal: Event | None = None
    opened: bool = False
    cancel_requested: bool = False
    stop_error: BackendStreamError | None = None  # a timeout the runner's sweeper decided
    finishing: bool = False  # past the point where a stop request can change the outcome
    task: asyncio.Task[None] | None = None
    notified_at: float = 0.0  # time.monotonic() of the last publish or poke
    token: str | None = None  # the room's lock while this attempt holds it (fencing token)
    max_output_tokens: int | None = None  # None: MAX_OUTPUT_TOKENS (a batch task's is larger)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def content(self) -> str:
        return "".join(self.chunks)

    def place(self) -> RoomPlace:
        """Where this attempt stands in its room (holding the lock, or queued)."""
        return RoomPlace(self.start.room_id, self.key.ticket(self.attempt), self.token)

    def changed(self) -> asyncio.Event:
        """The event set at the next publish; take it before reading the state."""
        return self._changed

    def publish_chunk(self, text: str, now: float) -> int:
        seq = len(self.chunks)
        self.chunks.append(text)
        self.events.append(chunk_event(seq, text))
        self.poke(now)
        return seq

    def publish_terminal(self, event: Event) -> None:
        if self.terminal is None:
            self.terminal = event
            self.poke(time.monotonic())

    def mark_opened(self) -> None:
        self.opened = True
        self.poke(time.monotonic())

    def poke(self, now: float) -> None:
        """Wake every listener (a publish, or the sweeper so idle listeners can ping)."""
        self.notified_at = now
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def request_cancel(self) -> None:
        """Stop the model; the runner stores what was said so far (finishReason cancelled)."""
        if self._stoppable():
            self.cancel_requested = True
            self._stop()

    def request_stop(self, error: BackendStreamError) -> None:
        """Stop the model; the generation fails with ``error`` (a timeout)."""
        if self._stoppable():
            self.stop_error = error
            self._stop()

    def _stoppable(self) -> bool:
        return not (self.finishing or self.cancel_requested or self.stop_error)

    def _stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def wait_opened(self, timeout_s: float) -> None:
        """Until the model accepted the request or the generation ended (or ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while not self.opened and self.terminal is None:
                await self.changed().wait()
