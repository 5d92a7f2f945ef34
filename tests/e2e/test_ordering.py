"""CONTRACT.md section 1 end to end: the official socket.io-client v4 (Node) against a real
bridge and a real backend (scripted model), every event checked in order per socket."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.bridge.harness import token
from tests.e2e.node import events, of, run_scenario

pytestmark = pytest.mark.e2e


def _rid() -> str:
    return f"req-{uuid.uuid4().hex[:10]}"


def _room() -> str:
    return f"room-{uuid.uuid4().hex[:10]}"


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def _sequence(records: list[dict[str, Any]], socket: str, rid: str) -> list[tuple[str, Any]]:
    """(kind/event, data) of one request on one socket, in arrival order."""
    seq = []
    for r in of(records, socket):
        data = r.get("data")
        if not isinstance(data, dict):
            continue
        request_id = data.get("requestId") or (data.get("message") or {}).get("requestId")
        if request_id != rid:
            continue
        seq.append(("ack" if r["kind"] == "ack" else r["event"], data))
    return seq


def _check_stream(seq: list[tuple[str, Any]], *, sender: bool) -> list[dict[str, Any]]:
    names = [n for n, _ in seq]
    chunks = [d for n, d in seq if n == "ai_message_chunk"]
    expected = (
        (["ack"] if sender else [])
        + ["new_message", "ai_message_start"]
        + ["ai_message_chunk"] * len(chunks)
        + ["ai_message_end"]
        + (["message_ack"] if sender else [])
    )
    assert names == expected
    assert chunks, "no chunk relayed"
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    end = seq[names.index("ai_message_end")][1]
    assert end["content"] == "".join(c["chunk"] for c in chunks)
    assert end["finishReason"] == "stop"
    for key in ("acceptedMs", "firstChunkMs", "totalMs", "backend"):
        assert key in end["latency"]
    message_id = seq[names.index("ai_message_start")][1]["messageId"]
    assert all(c["messageId"] == message_id for c in chunks)
    return chunks


def test_ordering_contract_for_sender_and_second_socket(bridge_url: str) -> None:
    user, room, rid = _user(), _room(), _rid()
    auth = {"token": token(user)}
    records = run_scenario(
        {
            "url": bridge_url,
            "sockets": {"a": {"auth": auth}, "b": {"auth": auth, "transports": ["polling"]}},
            "steps": [
                {"do": "connect", "socket": "a"},
                {"do": "connect", "socket": "b"},
                {"do": "emit", "socket": "a", "event": "join_room", "args": [{"roomId": room}]},
                {"do": "emit", "socket": "b", "event": "join_room", "args": [{"roomId": room}]},
                {
                    "do": "emit",
                    "socket": "a",
                    "event": "send_message",
                    "args": [{"roomId": room, "content": "hello", "requestId": rid}],
                },
                {"do": "waitFor", "socket": "a", "event": "message_ack"},
                {"do": "waitFor", "socket": "b", "event": "ai_message_end"},
                {"do": "sleep", "ms": 200},
            ],
        }  # fmt: skip
    )
    sender = _sequence(records, "a", rid)
    ack = sender[0][1]
    assert ack["ok"] is True and ack["stage"] == "accepted" and ack["path"] == "stream"
    assert ack["messageId"] == sender[2][1]["messageId"]
    chunks_a = _check_stream(sender, sender=True)
    chunks_b = _check_stream(_sequence(records, "b", rid), sender=False)
    assert chunks_a == chunks_b
    user_message = sender[1][1]["message"]
    assert (user_message["role"], user_message["content"], user_message["userId"]) == (
        "user", "hello", user,
    )  # fmt: skip
    done = sender[-1][1]
    assert (done["ok"], done["stage"], done["path"]) == (True, "done", "stream")
    assert events(records, "b", "message_ack") == []


def test_join_while_in_flight_replays_then_follows_live(bridge_url: str) -> None:
    user, room, rid = _user(), _room(), _rid()
    auth = {"token": token(user)}
    records = run_scenario(
        {
            "url": bridge_url,
            "sockets": {"a": {"auth": auth}, "late": {"auth": auth}},
            "steps": [
                {"do": "connect", "socket": "a"},
                {"do": "connect", "socket": "late"},
                {
                    "do": "emit",
                    "socket": "a",
                    "event": "send_message",
                    "args": [
                        {"roomId": room, "content": "[[tps=25]] [[tokens=40]]", "requestId": rid}
                    ],
                },
                {"do": "waitFor", "socket": "a", "event": "ai_message_chunk", "count": 3},
                {
                    "do": "emit",
                    "socket": "late",
                    "event": "join_room",
                    "args": [{"roomId": room}],
                    "label": "late-join",
                },
                {"do": "waitFor", "socket": "late", "event": "ai_message_end"},
                {"do": "waitFor", "socket": "a", "event": "message_ack"},
            ],
        }  # fmt: skip
    )
    join_ack = next(r for r in of(records, "late") if r["kind"] == "ack")["data"]
    assert join_ack["ok"] is True
    late = _sequence(records, "late", rid)
    names = [n for n, _ in late]
    assert names[0] == "ai_message_start" and names[-1] == "ai_message_end"
    chunks_late = [d for n, d in late if n == "ai_message_chunk"]
    assert [c["seq"] for c in chunks_late] == list(range(len(chunks_late)))
    chunks_a = _check_stream(_sequence(records, "a", rid), sender=True)
    assert chunks_late == chunks_a


def test_complete_path_when_streaming_is_off_for_the_user(bridge_url: str) -> None:
    room, rid = _room(), _rid()
    records = run_scenario(
        {
            "url": bridge_url,
            "sockets": {"a": {"auth": {"token": token("old-timer")}}},
            "steps": [
                {"do": "connect", "socket": "a"},
                {
                    "do": "emit",
                    "socket": "a",
                    "event": "send_message",
                    "args": [{"roomId": room, "content": "hi", "requestId": rid}],
                },
                {"do": "waitFor", "socket": "a", "event": "message_ack"},
            ],
        }  # fmt: skip
    )
    seq = _sequence(records, "a", rid)
    assert [n for n, _ in seq] == ["ack", "new_message", "new_message", "message_ack"]
    ack, user, reply, done = (d for _, d in seq)
    assert (ack["path"], ack["messageId"]) == ("complete", None)
    assert user["message"]["role"] == "user" and reply["message"]["role"] == "assistant"
    assert reply["message"]["content"]
    assert (done["ok"], done["path"], done["messageId"]) == (
        True,
        "complete",
        reply["message"]["id"],
    )


def test_refused_connection_gets_connect_error_unauthorized(bridge_url: str) -> None:
    records = run_scenario(
        {
            "url": bridge_url,
            "sockets": {
                "none": {},
                "bad": {"auth": {"token": "not-a-jwt"}},
                "expired": {"auth": {"token": token("x", ttl_s=-10)}},
                "header": {"extraHeaders": {"Authorization": f"Bearer {token('hdr')}"}},
            },
            "steps": [{"do": "connect", "socket": name} for name in ("none", "bad", "expired")]
            + [{"do": "connect", "socket": "header"}],
        }
    )
    for name in ("none", "bad", "expired"):
        (refused,) = [r for r in of(records, name) if r["kind"] == "connect_error"]
        assert refused["data"]["code"] == "UNAUTHORIZED", refused
        assert refused["data"]["message"]
    assert [r["kind"] for r in of(records, "header")][0] == "connect"
