"""One request's measurements and the state machine that fills them from wire events.

Every latency is measured from the request's *scheduled* send time, not from when it was actually
written to the socket (issue 4): a generator that falls behind, or a request that waits for a free
connection, shows up as latency instead of silently disappearing (coordinated omission).

Correctness counters record what the *server* got wrong: ``missing_terminal`` means the done ack
arrived without an ``ai_message_end``/``ai_message_error`` before it. A stream that simply never
ends is a failure (``stall`` / ``timeout``) and is not counted twice; a dropped connection is a
``disconnect``.

The tracker is protocol-agnostic: the Socket.IO driver and the direct SSE driver both feed it the
same calls (``on_ack``, ``on_chunk``, ``on_end`` ...), so both targets are measured identically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["Failure", "RequestRecord", "RequestTracker", "Timeouts"]


class Failure(StrEnum):
    """Why a request failed; ``None`` on a record means it succeeded."""

    ACK_TIMEOUT = "ack_timeout"  # no send_message ack (or SSE start) in time
    REJECTED = "rejected"  # ack ok=false / HTTP error before the stream; ``code`` says why
    AI_ERROR = "ai_error"  # ai_message_error (or SSE error / done ack ok=false); ``code``
    DISCONNECT = "disconnect"  # the connection dropped after the send, before the terminal event
    STALL = "stall"  # a gap between chunks over the stall limit
    TIMEOUT = "timeout"  # no first chunk / terminal event within the TTFT / total limit
    UNSENT = "unsent"  # no connection free (cap, or all disconnected) within the total limit


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    """Limits after which a request is failed; every wait in a run is bounded by one of these."""

    ack_s: float = 10.0
    ttft_s: float = 30.0
    stall_s: float = 10.0
    total_s: float = 60.0
    done_s: float = 5.0  # message_ack after the terminal event (a correctness check, not failure)


@dataclass(slots=True, kw_only=True)
class RequestRecord:
    """What one request did. Times are ms from its scheduled send; ``None`` = never happened.

    This is the JSONL line (``to_json``): the summary and the gates are computed from nothing else.
    """

    target: str
    index: int
    request_id: str
    user: int
    stage: int
    steady: bool
    scheduled_s: float
    dispatch_lag_ms: float | None = None  # generator's own lag: woke up late for this arrival
    slot_wait_ms: float | None = None  # waited for a free connection (concurrency cap)
    sent_ms: float | None = None  # written to the wire (= dispatch lag + slot wait + write)
    ack_ms: float | None = None
    ttft_ms: float | None = None
    completion_ms: float | None = None
    done_ms: float | None = None
    gaps_ms: list[float] = field(default_factory=list)
    chunks: int = 0
    path: str | None = None
    failure: str | None = None
    code: str | None = None
    seq_gaps: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    content_mismatch: bool = False
    missing_terminal: bool = False  # the done ack came, the terminal event never did
    missing_done: bool = False
    malformed: int = 0  # payloads that broke the contract's models

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def end_s(self) -> float:
        """When the request finished (or failed), seconds after the run started."""
        last = max(
            (
                v
                for v in (self.done_ms, self.completion_ms, self.ttft_ms, self.ack_ms, self.sent_ms)
                if v is not None
            ),
            default=0.0,
        )
        return self.scheduled_s + last / 1000.0

    def correctness_violations(self) -> int:
        return (
            self.seq_gaps
            + self.duplicates
            + self.out_of_order
            + int(self.content_mismatch)
            + int(self.missing_terminal)
            + int(self.missing_done)
            + self.malformed
        )

    def to_json(self) -> dict[str, Any]:
        return {"type": "request", **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        fields = {k: v for k, v in data.items() if k != "type"}
        return cls(**fields)


class RequestTracker:
    """Turns wire events for one request into its record; ``finished`` once nothing more is due.

    ``now`` arguments are ``time.perf_counter()`` values; ``scheduled_at`` is the scheduled send
    time on the same clock.
    """

    __slots__ = (
        "_chunk_parts",
        "_expect_done",
        "_last_event_at",
        "_max_seq",
        "_seen",
        "_terminal_at",
        "finished",
        "on_finished",
        "record",
        "scheduled_at",
        "timeouts",
    )

    def __init__(self, record: RequestRecord, scheduled_at: float, timeouts: Timeouts) -> None:
        self.record = record
        self.scheduled_at = scheduled_at
        self.timeouts = timeouts
        self.finished = False
        self.on_finished: Callable[[RequestTracker], None] | None = None
        self._seen: set[int] = set()
        self._chunk_parts: dict[int, str] = {}
        self._max_seq = -1
        self._last_event_at: float | None = None
        self._terminal_at: float | None = None
        self._expect_done = True

    def _ms(self, now: float) -> float:
        return (now - self.scheduled_at) * 1000.0

    def on_sent(self, now: float, *, expect_done: bool = True) -> None:
        self.record.sent_ms = self._ms(now)
        self._expect_done = expect_done

    def on_ack(self, now: float, *, ok: bool, path: str | None, code: str | None) -> None:
        if self.record.ack_ms is not None or self.finished:
            return
        self.record.ack_ms = self._ms(now)
        self._last_event_at = now
        if ok:
            self.record.path = path
        else:
            self._fail(Failure.REJECTED, code)

    def on_content(self, now: float) -> None:
        """The complete path's assistant ``new_message``: first and last content at once."""
        if self._terminal_at is not None or self.finished:
            return
        if self.record.ttft_ms is None:
            self.record.ttft_ms = self._ms(now)
        self._terminal(now)

    def on_chunk(self, now: float, seq: int, text: str) -> None:
        record = self.record
        if self.finished:
            return
        if seq in self._seen:
            record.duplicates += 1
            return
        if seq < self._max_seq:
            record.out_of_order += 1
        if self._last_event_at is not None and record.ttft_ms is not None:
            record.gaps_ms.append((now - self._last_event_at) * 1000.0)
        if record.ttft_ms is None:
            record.ttft_ms = self._ms(now)
        self._seen.add(seq)
        self._chunk_parts[seq] = text
        self._max_seq = max(self._max_seq, seq)
        record.chunks += 1
        self._last_event_at = now

    def on_end(self, now: float, content: str) -> None:
        if self._terminal_at is not None or self.finished:
            return
        joined = "".join(self._chunk_parts[s] for s in sorted(self._chunk_parts))
        self.record.content_mismatch = joined != content
        self._terminal(now)

    def on_error(self, now: float, code: str | None) -> None:
        if self._terminal_at is not None or self.finished:
            return
        if self.record.failure is None:
            self.record.failure = Failure.AI_ERROR.value
            self.record.code = code
        self._terminal(now, completed=False)  # still waits for the done ack

    def on_done(self, now: float, *, ok: bool, path: str | None, code: str | None) -> None:
        if self.finished:
            return
        if path:
            self.record.path = path
        self.record.done_ms = self._ms(now)
        if self._terminal_at is None:
            self.record.missing_terminal = True
        if not ok:
            self._fail(Failure.AI_ERROR, code)
        self._finish()

    def on_disconnect(self, now: float) -> None:
        if self.finished:
            return
        if self._terminal_at is not None:  # only the done ack was outstanding
            self.record.missing_done = True
            self._finish()
            return
        self._fail(Failure.DISCONNECT, None)

    def check_deadlines(self, now: float) -> None:
        """Fail the request if a limit passed; the runner calls this a few times a second."""
        if self.finished:
            return
        limits = self.timeouts
        age_s = now - self.scheduled_at
        record = self.record
        if self._terminal_at is not None:
            if now - self._terminal_at > limits.done_s:
                record.missing_done = True
                self._finish()
        elif record.ack_ms is None:
            if age_s > limits.total_s or (
                record.sent_ms is not None and age_s - record.sent_ms / 1000.0 > limits.ack_s
            ):
                self._fail(Failure.ACK_TIMEOUT, None)
        elif record.ttft_ms is None:
            if age_s > min(limits.ttft_s, limits.total_s):
                self._fail(Failure.TIMEOUT, None)
        elif self._last_event_at is not None and now - self._last_event_at > limits.stall_s:
            self._fail(Failure.STALL, None)
        elif age_s > limits.total_s:
            self._fail(Failure.TIMEOUT, None)

    def fail_unsent(self) -> None:
        self._fail(Failure.UNSENT, None)

    def abandon(self) -> None:
        """End a request the run can no longer wait for (only after every limit has passed)."""
        if self._terminal_at is not None:
            self.record.missing_done = True
            self._finish()
            return
        self._fail(Failure.TIMEOUT, None)

    def _terminal(self, now: float, *, completed: bool = True) -> None:
        self._terminal_at = now
        self._last_event_at = now
        if completed:
            self.record.completion_ms = self._ms(now)
        missing = (self._max_seq + 1) - len(self._seen)
        self.record.seq_gaps = max(missing, 0)
        if not self._expect_done:
            self._finish()

    def _fail(self, failure: Failure, code: str | None) -> None:
        if self.record.failure is None:
            self.record.failure = failure.value
            self.record.code = code
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._chunk_parts.clear()
        if self.on_finished is not None:
            self.on_finished(self)
