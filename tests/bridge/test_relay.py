"""The relay state machine without sockets or HTTP: scripted Upstream, recording EventSink."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from bridge.errors import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamHttpError,
    UpstreamTimeout,
)
from bridge.relay import Outcome, Relay, RelayJob
from bridge.settings import Timeouts
from bridge.upstream import Chunk, End, Failed, Start, UpstreamEvent
from contracts import (
    ChatRequest,
    CompleteResponse,
    ErrorCode,
    FinishReason,
    Path,
    StreamEnd,
    StreamError,
)

Step = UpstreamEvent | UpstreamError | float  # a float: the backend says nothing that long


class ScriptedStream:
    def __init__(self, steps: Sequence[Step]) -> None:
        self._steps = list(steps)
        self.closed = False

    def events(self) -> AsyncIterator[UpstreamEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[UpstreamEvent]:
        for step in self._steps:
            if isinstance(step, float):
                await asyncio.sleep(step)
                continue
            if isinstance(step, UpstreamError):
                raise step
            yield step
        raise UpstreamDisconnected("eof")

    async def aclose(self) -> None:
        self.closed = True


class ScriptedUpstream:
    def __init__(
        self,
        opened: Sequence[Step] | UpstreamError,
        resumes: Sequence[Sequence[Step] | UpstreamError] = (),
        complete: CompleteResponse | UpstreamError | None = None,
    ) -> None:
        self._opened = opened
        self._resumes = list(resumes)
        self._complete = complete
        self.resume_calls: list[int | None] = []
        self.complete_calls = 0

    async def open_stream(self, request: ChatRequest, traceparent: str) -> ScriptedStream:
        if isinstance(self._opened, UpstreamError):
            raise self._opened
        return ScriptedStream(self._opened)

    async def resume(
        self, request_id: str, user_id: str, last_seq: int | None, traceparent: str
    ) -> ScriptedStream:
        self.resume_calls.append(last_seq)
        if not self._resumes:
            raise UpstreamHttpError(404, ErrorCode.NOT_FOUND, "gone")
        nxt = self._resumes.pop(0)
        if isinstance(nxt, UpstreamError):
            raise nxt
        return ScriptedStream(nxt)

    async def complete(
        self, request: ChatRequest, traceparent: str, timeout_s: float
    ) -> CompleteResponse:
        self.complete_calls += 1
        if self._complete is None:
            raise UpstreamConnectError("down")
        if isinstance(self._complete, UpstreamError):
            raise self._complete
        return self._complete

    async def cancel(self, request_id: str, user_id: str, traceparent: str) -> None:
        return None


class RecordingSink:
    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    def ack(self, payload: dict[str, Any]) -> None:
        self.log.append(("ack", payload))

    async def begin(self, message_id: str) -> None:
        self.log.append(("begin", message_id))

    async def room(self, event: str, payload: dict[str, Any]) -> None:
        self.log.append((event, payload))

    def sender(self, event: str, payload: dict[str, Any]) -> None:
        self.log.append((f"sender:{event}", payload))

    def names(self) -> list[str]:
        return [n for n, _ in self.log]

    def chunks(self) -> list[str]:
        return [p["chunk"] for n, p in self.log if n == "ai_message_chunk"]

    def get(self, name: str) -> Any:
        return next(p for n, p in self.log if n == name)


REQ = ChatRequest(request_id="r1", room_id="room1", user_id="u1", content="hi")
START = Start("m1", "um1")


def _end(content: str = "Hello") -> End:
    return End(StreamEnd(message_id="m1", content=content, finish_reason=FinishReason.STOP))


def _complete(content: str = "Hello") -> CompleteResponse:
    return CompleteResponse(
        request_id="r1", room_id="room1", message_id="m1", user_message_id="um1",
        content=content, finish_reason=FinishReason.STOP,
    )  # fmt: skip


async def _run(
    upstream: ScriptedUpstream,
    *,
    fallback: bool = True,
    total_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    first_chunk_s: float = 20.0,
    queue_wait_s: float = 120.0,
) -> tuple[RecordingSink, Outcome]:
    sink = RecordingSink()
    job = RelayJob(request=REQ, received_at=clock(), fallback=fallback)
    timeouts = Timeouts(
        total_s=total_s, resume_s=5.0, max_resumes=3, first_chunk_s=first_chunk_s,
        queue_wait_s=queue_wait_s,
    )  # fmt: skip
    relay = Relay(job, upstream=upstream, sink=sink, timeouts=timeouts, clock=clock)
    return sink, await relay.run()


async def test_happy_path_order() -> None:
    sink, outcome = await _run(ScriptedUpstream([START, Chunk(0, "Hel"), Chunk(1, "lo"), _end()]))
    assert sink.names() == [
        "ack", "begin", "new_message", "ai_message_start", "ai_message_chunk",
        "ai_message_chunk", "ai_message_end", "sender:message_ack",
    ]  # fmt: skip
    assert sink.get("ack")["messageId"] == "m1"
    assert sink.get("new_message")["message"]["id"] == "um1"
    assert sink.get("ai_message_end")["content"] == "Hello"
    assert (outcome.ok, outcome.path) == (True, Path.STREAM)


async def test_duplicates_dropped_and_counted() -> None:
    steps: list[Step] = [START, Chunk(0, "Hel"), Chunk(0, "Hel"), Chunk(1, "lo"), Chunk(1, "lo")]
    steps.append(_end())
    sink, outcome = await _run(ScriptedUpstream(steps))
    assert sink.chunks() == ["Hel", "lo"] and outcome.duplicates == 2


async def test_gap_resumes_after_last_contiguous_seq() -> None:
    upstream = ScriptedUpstream(
        [START, Chunk(0, "Hel"), Chunk(2, "??")], resumes=[[START, Chunk(1, "lo"), _end()]]
    )
    sink, outcome = await _run(upstream)
    assert upstream.resume_calls == [0]
    assert sink.chunks() == ["Hel", "lo"] and outcome.resumes == 1
    assert sink.names().count("ai_message_start") == 1


async def test_drop_before_any_chunk_resumes_without_last_event_id() -> None:
    upstream = ScriptedUpstream(
        [START, UpstreamDisconnected("cut")], resumes=[[START, Chunk(0, "Hello"), _end()]]
    )
    sink, _ = await _run(upstream)
    assert upstream.resume_calls == [None] and sink.chunks() == ["Hello"]


async def test_resume_gone_falls_back_with_suffix_only() -> None:
    upstream = ScriptedUpstream([START, Chunk(0, "Hel")], complete=_complete("Hello there"))
    sink, outcome = await _run(upstream)
    assert sink.chunks() == ["Hel", "lo there"]
    assert sink.get("ai_message_end")["content"] == "Hello there"
    assert sink.get("sender:message_ack")["path"] == "fallback"
    assert outcome.path is Path.FALLBACK and outcome.reason == "fallback:resume_failed"


async def test_fallback_content_that_diverges_goes_only_into_the_end() -> None:
    upstream = ScriptedUpstream([START, Chunk(0, "Hel")], complete=_complete("Goodbye"))
    sink, _ = await _run(upstream)
    assert sink.chunks() == ["Hel"]
    assert sink.get("ai_message_end")["content"] == "Goodbye"


async def test_open_failure_falls_back_and_acks_before_the_fallback_result() -> None:
    upstream = ScriptedUpstream(UpstreamConnectError("down"), complete=_complete())
    sink, outcome = await _run(upstream)
    assert sink.names()[:4] == ["ack", "begin", "new_message", "ai_message_start"]
    assert sink.get("ack")["messageId"] is None
    assert sink.chunks() == ["Hello"] and outcome.ok


async def test_both_failing_after_start_is_one_error_and_failed_ack() -> None:
    upstream = ScriptedUpstream([START, Chunk(0, "Hel")], complete=UpstreamConnectError("x"))
    sink, outcome = await _run(upstream)
    assert sink.names()[-2:] == ["ai_message_error", "sender:message_ack"]
    assert sink.names().count("ai_message_error") == 1
    assert sink.get("sender:message_ack")["ok"] is False
    assert outcome.code is ErrorCode.BACKEND_UNAVAILABLE


async def test_refused_open_is_rejected_without_fallback() -> None:
    upstream = ScriptedUpstream(UpstreamHttpError(413, ErrorCode.MESSAGE_TOO_LONG, "long"))
    sink, outcome = await _run(upstream)
    assert sink.names() == ["ack"] and sink.get("ack")["code"] == "MESSAGE_TOO_LONG"
    assert upstream.complete_calls == 0 and outcome.rejected


async def test_fallback_disabled_before_start_rejects() -> None:
    sink, _ = await _run(ScriptedUpstream(UpstreamConnectError("down")), fallback=False)
    assert sink.names() == ["ack"] and sink.get("ack")["stage"] == "rejected"


async def test_fatal_error_event_is_not_retried() -> None:
    failed = Failed(StreamError(code=ErrorCode.MODEL_ERROR, message="x", retryable=False))
    upstream = ScriptedUpstream([START, Chunk(0, "Hel"), failed], complete=_complete())
    sink, _ = await _run(upstream)
    assert upstream.complete_calls == 0
    assert sink.get("ai_message_error")["code"] == "MODEL_ERROR"


async def test_first_chunk_timeout_goes_to_fallback_not_resume() -> None:
    upstream = ScriptedUpstream([START, UpstreamTimeout("ttft")], complete=_complete())
    sink, outcome = await _run(upstream)
    assert upstream.resume_calls == [] and outcome.reason == "fallback:first_chunk_timeout"
    assert sink.chunks() == ["Hello"]


async def test_resumed_stream_naming_another_message_is_not_trusted() -> None:
    upstream = ScriptedUpstream(
        [START, Chunk(0, "Hel")], resumes=[[Start("other", "u")]], complete=_complete()
    )
    sink, outcome = await _run(upstream)
    assert outcome.path is Path.FALLBACK and sink.chunks() == ["Hel", "lo"]


async def test_total_timeout_ends_with_stream_timeout_without_fallback() -> None:
    ticks = iter(range(0, 10_000, 4))  # every look at the clock is 4 s later

    upstream = ScriptedUpstream([START, Chunk(0, "a"), Chunk(1, "b")], complete=_complete())
    sink, outcome = await _run(upstream, total_s=10.0, clock=lambda: float(next(ticks)))
    assert outcome.code is ErrorCode.STREAM_TIMEOUT
    assert upstream.complete_calls == 0 and upstream.resume_calls == []
    assert sink.names()[-2:] == ["ai_message_error", "sender:message_ack"]


async def test_a_generation_queued_for_its_room_may_wait_past_the_first_chunk_timeout() -> None:
    """``start`` with ``queuePosition``: the first chunk comes once the room's earlier answers
    are done; the relay's waits allow for the queue (and only for a queued generation)."""
    queued = [Start("m1", "um1", 2), 0.6, Chunk(0, "Hello"), _end()]
    sink, outcome = await _run(
        ScriptedUpstream(queued), first_chunk_s=0.3, queue_wait_s=1.0, total_s=0.5
    )
    assert (outcome.ok, outcome.path) == (True, Path.STREAM)
    assert sink.get("ai_message_start")["queuePosition"] == 2
    assert sink.chunks() == ["Hello"]

    unqueued = [START, 0.6, Chunk(0, "Hello"), _end()]
    sink, outcome = await _run(
        ScriptedUpstream(unqueued, complete=_complete()), first_chunk_s=0.3, queue_wait_s=1.0
    )
    assert outcome.reason == "fallback:first_chunk_timeout"
    assert "queuePosition" not in sink.get("ai_message_start")
