"""Every payload the bridge builds by hand validates against the contract models."""

from __future__ import annotations

from typing import Any

from bridge import payloads
from contracts import (
    AiMessageChunk,
    AiMessageEnd,
    AiMessageError,
    AiMessageStart,
    BackendLatency,
    ErrorAck,
    ErrorCode,
    FinishReason,
    JoinRoomAck,
    MembersAck,
    MessageAck,
    NewMessage,
    Path,
    RoomEvent,
    RoomEventType,
    SendAccepted,
    SendRejected,
    SessionExpired,
    StreamEnd,
    TaskDone,
    parse,
)


def test_builders_match_the_contract_models() -> None:
    end_body = StreamEnd(message_id="m", content="hi", finish_reason=FinishReason.STOP)
    timing = payloads.latency(
        accepted_ms=1.0, first_chunk_ms=2.0, total_ms=3.0, backend=BackendLatency(total_ms=1.0)
    )
    cases = [
        (SendAccepted, payloads.accepted("r", "room", None, Path.FALLBACK)),
        (SendRejected, payloads.rejected(None, ErrorCode.EMPTY_MESSAGE, "x")),
        (SendRejected, payloads.rejected("r", ErrorCode.RATE_LIMITED, "x", 1500)),
        (SessionExpired, payloads.session_expired()),
        (ErrorAck, payloads.error_ack(ErrorCode.FORBIDDEN, "x")),
        (JoinRoomAck, payloads.join_ack("room", ["r"], ["u1", "u2"])),
        (MembersAck, payloads.members_ack("room", ["u1"])),
        (RoomEvent, payloads.room_event("room", RoomEventType.JOINED, "u1")),
        (AiMessageStart, payloads.start("r", "room", "m")),
        (AiMessageStart, payloads.start("r", "room", "m", 3)),
        (AiMessageChunk, payloads.chunk("r", "room", "m", 3, "tok")),
        (AiMessageEnd, payloads.end("r", "room", end_body, timing)),
        (AiMessageError, payloads.error("r", "room", None, ErrorCode.STREAM_TIMEOUT, "x")),
        (
            AiMessageError,
            payloads.error(
                "r", "room", "m", ErrorCode.RATE_LIMITED, "x", retryable=False, retry_after_ms=9
            ),
        ),
        (MessageAck, payloads.message_ack("r", "room", "m", ok=True, path=Path.STREAM)),
        (SendAccepted, payloads.accepted("r", "room", None, Path.BATCH, task_id="r")),
        (JoinRoomAck, payloads.join_ack("room", [], ["u1"], pending_tasks=["t1", "t2"])),
        (TaskDone, payloads.task_done("t", "room", "m", ok=True, code=None)),
        (TaskDone, payloads.task_done("t", "room", None, ok=False, code=ErrorCode.MODEL_TIMEOUT)),
        (
            NewMessage,
            payloads.new_message(
                room_id="room",
                message_id="u",
                request_id="r",
                role="user",
                content="c",
                user_id="u1",
                character_id=None,
            ),
        ),  # fmt: skip
    ]
    model: Any
    for model, built in cases:
        wire = parse(model, built).wire()
        # optional fields the builder leaves out (retryAfterMs) come back as null
        assert {k: v for k, v in wire.items() if k in built or v is not None} == built, model
        assert set(built) <= set(wire), model.__name__


def test_fallback_is_stream_in_the_ack_and_retryable_follows_the_code() -> None:
    assert payloads.accepted("r", "room", None, Path.FALLBACK)["path"] == "stream"
    assert payloads.error("r", "x", None, ErrorCode.MODEL_ERROR, "m")["retryable"] is True
    assert payloads.error("r", "x", None, ErrorCode.FORBIDDEN, "m")["retryable"] is False


def test_retryable_is_the_backends_word_when_it_gave_one() -> None:
    """Issue 7: a backend error event {MODEL_ERROR, retryable: false} reached the room as
    retryable: true, derived from the code."""
    word = payloads.error("r", "x", None, ErrorCode.MODEL_ERROR, "m", retryable=False)
    assert word["retryable"] is False
    again = payloads.error("r", "x", None, ErrorCode.FORBIDDEN, "m", retryable=True)
    assert again["retryable"] is True
