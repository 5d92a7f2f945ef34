"""DeliveryFilter: start, contiguous seq, one terminal per socket, whatever the sources."""

from __future__ import annotations

import json

from bridge.fanout import DeliveryFilter, encode, encode_ack


def _chunk(seq: int, mid: str = "m") -> dict[str, object]:
    return {"messageId": mid, "seq": seq, "chunk": str(seq)}


def test_chunk_needs_start_and_the_next_seq() -> None:
    f = DeliveryFilter()
    assert not f.admit("s", "ai_message_chunk", _chunk(0))
    assert f.admit("s", "ai_message_start", {"messageId": "m"})
    assert f.admit("s", "ai_message_chunk", _chunk(0))
    assert not f.admit("s", "ai_message_chunk", _chunk(0))  # duplicate
    assert not f.admit("s", "ai_message_chunk", _chunk(2))  # ahead
    assert f.admit("s", "ai_message_chunk", _chunk(1))


def test_one_terminal_after_start() -> None:
    f = DeliveryFilter()
    assert not f.admit("s", "ai_message_end", {"messageId": "m"})
    f.admit("s", "ai_message_start", {"messageId": "m"})
    assert f.admit("s", "ai_message_end", {"messageId": "m"})
    assert not f.admit("s", "ai_message_error", {"messageId": "m"})
    assert not f.admit("s", "ai_message_chunk", _chunk(0))
    assert f.has_ended("s", "m")


def test_start_replays_from_zero_for_a_rejoin() -> None:
    f = DeliveryFilter()
    f.admit("s", "ai_message_start", {"messageId": "m"})
    f.admit("s", "ai_message_chunk", _chunk(0))
    assert f.admit("s", "ai_message_start", {"messageId": "m"})
    assert f.admit("s", "ai_message_chunk", _chunk(0))


def test_followed_socket_takes_only_the_followers_events() -> None:
    f = DeliveryFilter()
    f.follow("s", "m")
    assert not f.admit("s", "ai_message_start", {"messageId": "m"})
    assert f.admit("s", "ai_message_start", {"messageId": "m"}, follower=True)
    assert not f.admit("s", "ai_message_end", {"messageId": "m"})
    f.unfollow("s", "m")
    assert f.admit("s", "ai_message_chunk", _chunk(0))


def test_other_events_and_errors_without_message_pass() -> None:
    f = DeliveryFilter()
    assert f.admit("s", "new_message", {"x": 1})
    assert f.admit("s", "ai_message_error", {"messageId": None})


def test_state_is_bounded_and_forgotten() -> None:
    f = DeliveryFilter(max_tracked=4)
    for i in range(10):
        f.admit("s", "ai_message_start", {"messageId": f"m{i}"})
    assert f.tracked() == 4
    f.forget("s")
    assert f.tracked() == 0


def test_encoding_is_a_socketio_event_and_ack() -> None:
    pkt = encode("ai_message_chunk", {"chunk": "é"})
    assert pkt.encode() == '42["ai_message_chunk",{"chunk":"é"}]'
    ack = encode_ack(7, {"ok": True})
    assert ack.encode() == "437" + json.dumps([{"ok": True}], separators=(",", ":"))
