"""The relay against a backend that misbehaves at the wire (tests/bridge/fake_backend.py).

A real bridge on loopback, a real Socket.IO client, the fake backend on its own uvicorn: each
fault ends with the contract's events and no duplicate or lost text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.errors import StoreError
from tests.bridge.fake_backend import TOKEN, FakeBackend, Script
from tests.bridge.harness import (
    FAST_ENV,
    RunningBridge,
    assert_contract_stream,
    connected,
    new_id,
    running_bridge,
)

FULL = "Hello, world"


@pytest.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    async with FakeBackend() as backend:
        yield backend


@pytest.fixture
async def bridge(redis_url: str, fake: FakeBackend) -> AsyncIterator[RunningBridge]:
    async with running_bridge(redis_url, fake.url, TOKEN) as running:
        yield running


async def _send(bridge: RunningBridge, *, user: str | None = None) -> tuple[Any, Any, str]:
    user = user or new_id("user")
    room, rid = new_id("room"), new_id("req")
    async with connected(bridge.url, user) as client:
        ack = await client.call("send_message", {"roomId": room, "content": "hi", "requestId": rid})
        if ack.get("ok"):
            await client.wait_for("message_ack")
        return client, ack, rid


async def test_happy_path_relays_every_chunk_in_order(bridge: RunningBridge) -> None:
    client, ack, rid = await _send(bridge)
    assert ack["ok"] and ack["stage"] == "accepted" and ack["path"] == "stream"
    assert ack["messageId"] == "m-1"
    assert assert_contract_stream(client, rid, sender=True) == FULL
    done = client.named("message_ack")[0]
    assert done == {
        "requestId": rid, "roomId": ack["roomId"], "messageId": "m-1", "stage": "done",
        "ok": True, "path": "stream", "code": None,
    }  # fmt: skip


async def test_backend_requests_carry_token_traceparent_and_body(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    _, ack, rid = await _send(bridge, user="alice-1")
    (post,) = fake.calls("POST", "/chat/messages/stream")
    assert post.headers["authorization"] == f"Bearer {TOKEN}"
    version, trace_id, span_id, flags = post.headers["traceparent"].split("-")
    assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "01")
    assert post.body == {
        "requestId": rid, "roomId": ack["roomId"], "userId": "alice-1", "content": "hi",
        "characterId": None,
    }  # fmt: skip


async def test_503_before_start_falls_back_to_complete(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(stream_status=503)
    client, ack, rid = await _send(bridge)
    assert ack["ok"] and ack["messageId"] is None and ack["path"] == "stream"
    assert assert_contract_stream(client, rid, sender=True) == FULL
    assert client.named("message_ack")[0]["path"] == "fallback"
    assert len(fake.completes()) == 1
    # Issue 7: the user's new_message carried "u:{requestId}" when no start came; it is the
    # stored user message's id, from the complete reply's userMessageId.
    (user,) = [m["message"] for m in client.named("new_message") if m["message"]["role"] == "user"]
    assert user["id"] == "u-1"


async def test_cut_after_chunks_resumes_with_last_event_id(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(cut_after=2)
    client, _, rid = await _send(bridge, user="bob-2")
    assert assert_contract_stream(client, rid, sender=True) == FULL
    assert client.named("message_ack")[0]["path"] == "stream"
    (resume,) = fake.calls("GET", "/chat/messages/stream/")
    assert resume.headers["last-event-id"] == "1"
    assert resume.query["userId"] == ["bob-2"]
    assert resume.path.endswith(rid)


async def test_cut_without_working_resume_falls_back_with_unseen_suffix(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(cut_after=2, resume_status=503)
    client, _, rid = await _send(bridge)
    assert assert_contract_stream(client, rid, sender=True) == FULL
    chunks = [c["chunk"] for c in client.named("ai_message_chunk")]
    assert chunks == ["Hel", "lo", ", world"]  # the suffix the room had not seen, once
    assert client.named("message_ack")[0]["path"] == "fallback"


async def test_resume_that_keeps_breaking_ends_in_fallback(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(cut_after=1, cut_every_stream=True)
    client, _, rid = await _send(bridge)
    assert assert_contract_stream(client, rid, sender=True) == FULL
    assert client.named("message_ack")[0]["path"] == "fallback"


async def test_duplicate_seq_is_dropped(bridge: RunningBridge, fake: FakeBackend) -> None:
    fake.script = Script(duplicate_seqs=frozenset({0, 3}))
    client, _, rid = await _send(bridge)
    assert assert_contract_stream(client, rid, sender=True) == FULL
    assert len(client.named("ai_message_chunk")) == 5


async def test_seq_gap_resumes_from_last_contiguous_seq(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(skip_seq=2)
    client, _, rid = await _send(bridge)
    assert assert_contract_stream(client, rid, sender=True) == FULL
    (resume,) = fake.calls("GET", "/chat/messages/stream/")
    assert resume.headers["last-event-id"] == "1"


def _faults(bridge: RunningBridge, kind: str) -> float:
    value: float = bridge.bridge.metrics.relay_faults.labels(kind=kind)._value.get()
    return value


async def test_end_content_that_differs_from_the_chunks_is_a_relay_fault(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    assert _faults(bridge, "content_mismatch") == 0
    client, _, rid = await _send(bridge)  # a healthy stream first: no fault
    assert _faults(bridge, "content_mismatch") == 0
    fake.script = Script(end_content="Hello, World!")
    client, _, rid = await _send(bridge)
    (end,) = client.named("ai_message_end")
    assert end["content"] == "Hello, World!"  # authoritative, corrects every client
    assert _faults(bridge, "content_mismatch") == 1  # the rollout's relay_faults gate


async def test_a_gap_nothing_repairs_is_counted_unrepaired(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(skip_seq=2)  # repaired by a resume: not counted
    await _send(bridge)
    assert (_faults(bridge, "gap"), _faults(bridge, "gap_unrepaired")) == (1, 0)
    fake.script = Script(skip_seq=2, resume_status=404, complete_status=503)
    client, _, rid = await _send(bridge)
    assert client.named("message_ack")[0]["ok"] is False
    assert (_faults(bridge, "gap"), _faults(bridge, "gap_unrepaired")) == (2, 1)


async def test_retryable_error_event_falls_back(bridge: RunningBridge, fake: FakeBackend) -> None:
    fake.script = Script(error_after=2, error_retryable=True)
    client, _, rid = await _send(bridge)
    assert assert_contract_stream(client, rid, sender=True) == FULL
    assert client.named("message_ack")[0]["path"] == "fallback"


async def test_fatal_error_event_ends_with_ai_message_error(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(error_after=2, error_retryable=False, error_code="MODEL_ERROR")
    client, _, rid = await _send(bridge)
    assert_contract_stream(client, rid, sender=True)
    (error,) = client.named("ai_message_error")
    assert error["code"] == "MODEL_ERROR" and error["messageId"] == "m-1"
    # Regression (issue 7): retryable was derived from the code (MODEL_ERROR: true), not the
    # backend's own word.
    assert error["retryable"] is False
    done = client.named("message_ack")[0]
    assert (done["ok"], done["code"]) == (False, "MODEL_ERROR")
    assert not fake.completes()  # no fallback for a fatal model error


async def test_both_endpoints_down_errors_once(bridge: RunningBridge, fake: FakeBackend) -> None:
    fake.script = Script(stream_status=503, complete_status=503)
    client, ack, rid = await _send(bridge)
    assert ack["ok"]  # accepted when the fallback request was sent
    (error,) = client.named("ai_message_error")
    assert error["code"] == "BACKEND_UNAVAILABLE" and error["retryable"] is True
    assert client.names() == ["ai_message_error", "message_ack"]
    done = client.named("message_ack")[0]
    assert (done["ok"], done["path"], done["code"]) == (False, "fallback", "BACKEND_UNAVAILABLE")


async def test_backend_unreachable_and_fallback_off_rejects(redis_url: str) -> None:
    env = {"CHAT_STREAMING_FALLBACK": "false"}
    async with running_bridge(redis_url, "http://127.0.0.1:9", TOKEN, env) as bridge:
        client, ack, _ = await _send(bridge)
        failed = bridge.bridge.metrics.requests.labels(path="stream", ok="false")._value.get()
    assert ack == {
        "ok": False, "stage": "rejected", "requestId": ack["requestId"],
        "code": "BACKEND_UNAVAILABLE", "message": ack["message"],
    }  # fmt: skip
    assert client.events == []
    assert failed == 1  # a failed send for the rollout's failed_sends gate


async def test_a_refusal_for_the_users_reason_is_no_failed_send(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(stream_status=429, stream_code="RATE_LIMITED", stream_retry_after="3")
    _, ack, _ = await _send(bridge)
    assert (ack["ok"], ack["code"]) == (False, "RATE_LIMITED")
    metrics = bridge.bridge.metrics
    assert metrics.requests.labels(path="stream", ok="false")._value.get() == 0


async def test_no_first_chunk_within_timeout_falls_back(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(first_chunk_delay_s=4.0)
    client, _, rid = await _send(bridge)
    assert assert_contract_stream(client, rid, sender=True) == FULL
    assert client.named("message_ack")[0]["path"] == "fallback"


async def test_no_first_chunk_and_complete_stalls_ends_with_stream_timeout(
    redis_url: str, fake: FakeBackend
) -> None:
    fake.script = Script(first_chunk_delay_s=10.0, complete_delay_s=10.0)
    env = {"BRIDGE_TOTAL_TIMEOUT_S": "3"}
    async with running_bridge(redis_url, fake.url, TOKEN, env) as bridge:
        client, _, rid = await _send(bridge)
    assert_contract_stream(client, rid, sender=True)
    (error,) = client.named("ai_message_error")
    assert error["code"] == "STREAM_TIMEOUT"
    assert client.named("message_ack")[0]["ok"] is False


async def test_refused_request_is_rejected_not_retried(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    fake.script = Script(stream_status=429, stream_code="RATE_LIMITED", stream_retry_after="7")
    client, ack, _ = await _send(bridge)
    assert (ack["ok"], ack["stage"], ack["code"]) == (False, "rejected", "RATE_LIMITED")
    assert ack["retryAfterMs"] == 7000  # issue 7: the backend's Retry-After, relayed
    assert not fake.completes()
    assert client.events == []


async def test_error_body_retryable_reaches_the_room_when_both_paths_fail(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    """The backend's word in an error body (here: not retryable) outranks the code's default."""
    fake.script = Script(stream_status=503, stream_retryable=False, complete_status=503)
    client, _, _ = await _send(bridge)
    (error,) = client.named("ai_message_error")
    assert (error["code"], error["retryable"]) == ("BACKEND_UNAVAILABLE", False)


async def test_cancel_calls_backend_with_user_id(bridge: RunningBridge, fake: FakeBackend) -> None:
    fake.script = Script(chunks=["a"] * 40, chunk_delay_s=0.05)
    room, rid = new_id("room"), new_id("req")
    async with connected(bridge.url, "carol-3") as client:
        await client.call("send_message", {"roomId": room, "content": "hi", "requestId": rid})
        await client.wait_for("ai_message_chunk", 2)
        assert await client.call("cancel_message", {"requestId": rid}) == {"ok": True}
        await client.wait_for("message_ack")
    (cancel,) = fake.calls("POST", f"/chat/messages/{rid}/cancel")
    assert cancel.query["userId"] == ["carol-3"]
    (end,) = client.named("ai_message_end")
    assert end["finishReason"] == "cancelled"
    assert client.named("message_ack")[0]["ok"] is True
    assert assert_contract_stream(client, rid, sender=True) == end["content"]


async def test_no_start_event_within_open_budget_falls_back_with_the_whole_sequence(
    bridge: RunningBridge, fake: FakeBackend
) -> None:
    """Regression: under load the stream's ``start`` came after the open budget; the fallback
    then sent the sender its acks but the room no ``ai_message_start``/chunks/end (the load
    tester counted ``missingTerminal`` on every such request)."""
    fake.script = Script(send_start=False)
    client, ack, rid = await _send(bridge)
    assert ack["ok"] and ack["messageId"] is None
    assert assert_contract_stream(client, rid, sender=True) == FULL
    assert client.named("message_ack")[0]["path"] == "fallback"


@pytest.mark.parametrize("swallows_cancel", [False, True], ids=["cancelled", "swallowed"])
async def test_slow_room_store_at_start_is_not_a_backend_wait(
    bridge: RunningBridge, monkeypatch: pytest.MonkeyPatch, swallows_cancel: bool
) -> None:
    """Regression (load test, every fallback missingTerminal): under load the Redis round trip
    of ``rooms.begin`` (on ``start``) outlasted what was left of the relay's first-event wait.
    The expiring timer cancelled ``_start`` half-way: the relay counted as started, so the
    fallback skipped ``new_message``/``ai_message_start`` and the delivery filter dropped its
    chunks and terminal; the sender got only the acks. When the cancellation was swallowed
    (turned into a store error), the relay crashed instead (INTERNAL)."""
    registry = bridge.bridge.rooms
    real_begin = registry.begin
    slow_s = float(FAST_ENV["BRIDGE_FIRST_EVENT_TIMEOUT_S"]) + 0.5

    async def slow_begin(room_id: str, request_id: str, user_id: str, message_id: str) -> bool:
        try:
            await asyncio.sleep(slow_s)
        except asyncio.CancelledError:
            if not swallows_cancel:
                raise
            raise StoreError("begin: redis unavailable (cancelled read)") from None
        return await real_begin(room_id, request_id, user_id, message_id)

    monkeypatch.setattr(registry, "begin", slow_begin)
    client, ack, rid = await _send(bridge)
    assert ack["ok"] and ack["messageId"] == "m-1"
    assert assert_contract_stream(client, rid, sender=True) == FULL
    done = client.named("message_ack")[0]
    assert done["ok"] and done["path"] == "stream"
