"""The events a request sees for a generation: start, chunks after a seq, pings, the terminal.

Local generations are followed in memory (see ``generation.py``). Others are read from their
Redis Stream with XREAD BLOCK, starting right after the last entry id seen: entry ids are
``seq+1``, so "buffered" and "live" are the same read and nothing is missed or repeated. An empty
read checks the record: a generation that ended whose buffer has expired still ends the stream
(from the record), one whose record vanished or stays silent too long ends it with an error.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from backend_stream.generation import (
    PING_FRAME,
    Event,
    Generation,
    chunk_event,
    payload_event,
    start_event,
)
from backend_stream.registry import Attachment
from backend_stream.settings import Settings
from backend_stream.store import GenerationStore, GenState, entry_id
from contracts import BackendLatency, ErrorCode, SseEvent, StreamError

PING = Event(SseEvent.START, PING_FRAME)  # kind unused: recognised by identity
MAX_BLOCK_S = 1.0
# A remote listener gives up after the longest a healthy generation can stay silent, plus this.
SILENCE_MARGIN_S = 5.0


def is_ping(event: Event) -> bool:
    return event is PING


class EventFeed:
    """Builds the event iterator for an attachment, local or remote."""

    def __init__(self, store: GenerationStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._ping_s = settings.ping_interval_s
        self._max_silence_s = (
            max(settings.first_token_timeout_s, settings.idle_timeout_s) + SILENCE_MARGIN_S
        )
        self._max_total_s = settings.total_timeout_s + SILENCE_MARGIN_S

    def events(
        self, att: Attachment, *, after_seq: int, received_at: float
    ) -> AsyncGenerator[Event, None]:
        if att.local is not None:
            return self._local(att, att.local, after_seq, received_at)
        return self._remote(att, after_seq, received_at)

    async def _local(
        self, att: Attachment, gen: Generation, after_seq: int, received_at: float
    ) -> AsyncGenerator[Event, None]:
        yield start_event(att.start)
        i = after_seq + 1
        last_write_at = time.monotonic()
        deadline = last_write_at + self._max_total_s
        while True:
            changed = gen.changed()
            while i < len(gen.events):
                yield gen.events[i]
                i += 1
                last_write_at = time.monotonic()
            if gen.terminal is not None:
                yield _for_listener(gen.terminal, att.attached, received_at)
                return
            # No timeout here: the runner's sweeper pokes idle generations (runner.py).
            await changed.wait()
            now = time.monotonic()
            if now > deadline:
                yield _error_event(ErrorCode.STREAM_TIMEOUT, "generation did not end in time")
                return
            if i == len(gen.events) and now - last_write_at >= self._ping_s:
                last_write_at = now
                yield PING

    async def _remote(
        self, att: Attachment, after_seq: int, received_at: float
    ) -> AsyncGenerator[Event, None]:
        yield start_event(att.start)
        last_id = entry_id(after_seq) if after_seq >= 0 else "0-0"
        now = time.monotonic()
        last_entry_at = last_write_at = now
        deadline = now + self._max_total_s
        block_ms = max(1, int(min(self._ping_s, MAX_BLOCK_S) * 1000))
        state = att.state
        while True:
            block = None if state is not GenState.RUNNING else block_ms
            entries = await self._store.read_buffer(att.key, att.attempt, last_id, block)
            for eid, fields in entries:
                last_id = eid
                kind, data = fields.get("t"), fields.get("d", "")
                if kind == "c":
                    yield chunk_event(int(eid.split("-", 1)[0]) - 1, data)
                else:
                    ra = fields.get("ra")
                    terminal = _terminal_from(kind, data, float(ra) if ra else None)
                    yield _for_listener(terminal, att.attached, received_at)
                    return
            now = time.monotonic()
            if entries:
                last_entry_at = last_write_at = now
                continue
            meta = await self._store.get_meta(att.key)
            if not meta or meta.get("attempt") != str(att.attempt):
                yield _error_event(ErrorCode.STREAM_TIMEOUT, "generation is no longer available")
                return
            if await self._store.is_orphaned(att.key, meta):
                yield _error_event(
                    ErrorCode.BACKEND_UNAVAILABLE, "the generation's backend stopped"
                )
                return
            new_state = GenState(meta.get("state", GenState.RUNNING))
            if new_state is not GenState.RUNNING and state is not GenState.RUNNING:
                # Ended, one last non-blocking read found nothing: the buffer has expired.
                yield _for_listener(_terminal_from_meta(meta), att.attached, received_at)
                return
            state = new_state
            if now - last_entry_at > self._max_silence_s or now > deadline:
                yield _error_event(ErrorCode.STREAM_TIMEOUT, "generation went silent")
                return
            if now - last_write_at >= self._ping_s:
                last_write_at = now
                yield PING


def _terminal_from(kind: str | None, data: str, retry_after_s: float | None) -> Event:
    try:
        payload: dict[str, Any] = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _error_event(ErrorCode.INTERNAL, "corrupt generation record")
    return payload_event(SseEvent.END if kind == "end" else SseEvent.ERROR, payload, retry_after_s)


def _terminal_from_meta(meta: dict[str, str]) -> Event:
    if meta.get("state") == GenState.DONE and "end" in meta:
        return _terminal_from("end", meta["end"], None)
    retry_after = meta.get("retryAfter") or None
    return _terminal_from(
        "error", meta.get("error", "{}"), float(retry_after) if retry_after else None
    )


def _error_event(code: ErrorCode, message: str) -> Event:
    err = StreamError(code=code, message=message, retryable=True)
    return payload_event(SseEvent.ERROR, err.wire())


def _for_listener(event: Event, attached: bool, received_at: float) -> Event:
    """An attached request's ``end`` carries only its own total (contracts: BackendLatency)."""
    if not attached or event.kind is not SseEvent.END or event.payload is None:
        return event
    total_ms = round((time.monotonic() - received_at) * 1000, 3)
    payload = {**event.payload, "latency": BackendLatency(total_ms=total_ms).wire()}
    return payload_event(SseEvent.END, payload)
