from __future__ import annotations

import pytest

from contracts import (
    AiMessageChunk,
    ChatRequest,
    ContractError,
    ErrorCode,
    MessageAck,
    Path,
    SendAccepted,
    SendMessage,
    StreamEnd,
    check_content,
    parse,
    parse_json,
)


def test_wire_is_camel_case_and_accepts_snake_attributes() -> None:
    chunk = AiMessageChunk(request_id="r1", room_id="room1", message_id="m1", seq=0, chunk="Hi")
    assert chunk.wire() == {
        "requestId": "r1",
        "roomId": "room1",
        "messageId": "m1",
        "seq": 0,
        "chunk": "Hi",
    }


def test_unknown_fields_are_ignored() -> None:
    msg = parse(SendMessage, {"roomId": "r", "content": "hi", "somethingNew": [1, 2]})
    assert msg.room_id == "r"
    assert "somethingNew" not in msg.wire()


def test_accepted_ack_keeps_null_message_id() -> None:
    ack = SendAccepted(request_id="r1", room_id="a", message_id=None, path=Path.COMPLETE)
    assert ack.wire() == {
        "ok": True,
        "stage": "accepted",
        "requestId": "r1",
        "roomId": "a",
        "messageId": None,
        "path": "complete",
        "taskId": None,  # batch only (the bridge leaves it out on the other paths)
    }


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "text",
        [1, 2],
        42,
        {},
        {"roomId": 5, "content": "x"},
        {"roomId": "r", "content": 5},
        {"roomId": "r"},
        {"roomId": "", "content": "x"},
        {"roomId": "a b", "content": "x"},
        {"roomId": "r" * 200, "content": "x"},
        {"roomId": "r", "content": "x", "requestId": True},
        {"roomId": "r", "content": ["x"]},
    ],
)
def test_malformed_send_message_is_invalid_payload(payload: object) -> None:
    with pytest.raises(ContractError) as info:
        parse(SendMessage, payload)
    assert info.value.code is ErrorCode.INVALID_PAYLOAD


def test_error_message_never_echoes_the_input() -> None:
    secret = "my secret content"
    with pytest.raises(ContractError) as info:
        parse(ChatRequest, {"requestId": "r", "roomId": "x", "userId": 7, "content": secret})
    assert secret not in info.value.message
    assert "userId" in info.value.message


def test_check_content_codes() -> None:
    with pytest.raises(ContractError) as empty:
        check_content("  \n\t", 10)
    assert empty.value.code is ErrorCode.EMPTY_MESSAGE
    with pytest.raises(ContractError) as long:
        check_content("x" * 11, 10)
    assert long.value.code is ErrorCode.MESSAGE_TOO_LONG
    check_content("x" * 10, 10)


def test_parse_json_rejects_non_json() -> None:
    with pytest.raises(ContractError) as info:
        parse_json(StreamEnd, b"{not json")
    assert info.value.code is ErrorCode.INVALID_PAYLOAD


def test_seq_must_be_a_non_negative_integer() -> None:
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ContractError):
            parse(AiMessageChunk, {"requestId": "r", "roomId": "a", "messageId": "m",
                                   "seq": bad, "chunk": "x"})  # fmt: skip


def test_message_ack_round_trip() -> None:
    ack = MessageAck(request_id="r", room_id="a", message_id="m", ok=False, path=Path.FALLBACK,
                     code=ErrorCode.BACKEND_FAILED)  # fmt: skip
    assert parse(MessageAck, ack.wire()) == ack
