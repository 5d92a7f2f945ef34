"""HTTP surface: SSE bytes on the wire, auth, probes, history and the bad-input table."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.backend_stream.conftest import (
    AUTH,
    MAX_CONTENT_CHARS,
    Backend,
    body,
    ids,
    parse_frames,
)


async def post_stream_raw(backend: Backend, payload: dict[str, Any]) -> httpx.Response:
    async with backend.client() as client:
        resp = await client.post("/chat/messages/stream", json=payload)
        await resp.aread()
        return resp


async def test_stream_bytes_on_the_wire_match_the_contract_including_pings(
    backend: Backend,
) -> None:
    payload = body("hello [[ttft_ms=700]] [[tokens=5]]")
    resp = await post_stream_raw(backend, payload)

    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    raw = resp.content
    assert raw.startswith(b"event: start\ndata: {")
    frames = parse_frames(raw)
    start = json.loads(frames[0]["data"])
    assert set(frames[0]) == {"event", "data"}
    assert start["requestId"] == payload["requestId"]
    assert start["roomId"] == payload["roomId"]
    assert start["messageId"] and start["userMessageId"]
    assert {"comment": "ping"} in frames, "an idle stream must carry ': ping' comments"
    chunks = [f for f in frames if f.get("event") == "chunk"]
    assert [int(f["id"]) for f in chunks] == list(range(len(chunks)))
    for frame in chunks:
        assert list(frame) == ["id", "event", "data"]
        data = json.loads(frame["data"])
        assert data == {"seq": int(frame["id"]), "chunk": data["chunk"]}
    end = frames[-1]
    assert end["event"] == "end" and "id" not in end
    end_data = json.loads(end["data"])
    assert end_data["messageId"] == start["messageId"]
    assert end_data["content"] == "".join(json.loads(f["data"])["chunk"] for f in chunks)
    assert end_data["finishReason"] == "stop"
    assert end_data["usage"]["completionTokens"] == 5
    latency = end_data["latency"]
    for stage in ("settingsLoadedMs", "promptBuiltMs", "modelFirstTokenMs", "modelDoneMs"):
        assert latency[stage] is not None
    assert latency["modelFirstTokenMs"] >= 650  # the scripted model's TTFT


async def test_scripted_reply_is_korean_for_hangul_and_deterministic(backend: Backend) -> None:
    async with backend.client() as client:
        first = await client.post("/chat/messages", json=body("안녕하세요 반가워요"))
        second = await client.post("/chat/messages", json=body("안녕하세요 반가워요"))
        english = await client.post("/chat/messages", json=body("good morning"))
    assert first.status_code == second.status_code == english.status_code == 200
    assert first.json()["content"] == second.json()["content"]
    assert any("\uac00" <= ch <= "\ud7a3" for ch in first.json()["content"])
    assert english.json()["content"].isascii()


async def test_history_returns_user_and_assistant_messages_oldest_first(
    backend: Backend,
) -> None:
    payload = body("tell me something")
    async with backend.client() as client:
        done = (await client.post("/chat/messages", json=payload)).json()
        hist = await client.get(f"/chat/rooms/{payload['roomId']}/messages", params={"limit": 10})
    assert hist.status_code == 200
    messages = hist.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "tell me something"
    assert messages[0]["userId"] == payload["userId"]
    assert messages[1]["id"] == done["messageId"]
    assert messages[1]["content"] == done["content"]
    # Issue 7: the complete reply names the stored user message too (new_message.id on the
    # bridge's complete path and fallback)
    assert messages[0]["id"] == done["userMessageId"]


async def test_refusals_carry_retryable_and_rate_limits_retry_after(backend: Backend) -> None:
    async with backend.client() as client:
        limited = await client.post("/chat/messages/stream", json=body("x [[fail=429]]"))
        empty = await client.post("/chat/messages/stream", json=body("   "))
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json() == {"code": "RATE_LIMITED", "message": limited.json()["message"],
                              "retryable": True}  # fmt: skip
    assert empty.status_code == 400
    assert (empty.json()["code"], empty.json()["retryable"]) == ("EMPTY_MESSAGE", False)


async def test_probes_and_metrics_need_no_token(backend: Backend) -> None:
    async with httpx.AsyncClient(base_url=backend.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert "backend_model_calls_total" in metrics.text


async def test_resume_without_user_id_is_ambiguous_when_two_users_share_a_request_id(
    backend: Backend,
) -> None:
    shared = ids()
    async with backend.client() as client:
        for user in ("alice-1", "bob-2"):
            payload = {**shared, "userId": user, "content": "hi"}
            assert (await client.post("/chat/messages", json=payload)).status_code == 200
        ambiguous = await client.get(f"/chat/messages/stream/{shared['requestId']}")
        resolved = await client.get(
            f"/chat/messages/stream/{shared['requestId']}", params={"userId": "bob-2"}
        )
    assert ambiguous.status_code == 409
    assert ambiguous.json()["code"] == "INVALID_PAYLOAD"
    assert resolved.status_code == 200
    assert parse_frames(resolved.content)[-1]["event"] == "end"


def _post(path: str, content: bytes | None = None, **kw: Any) -> dict[str, Any]:
    return {"method": "POST", "path": path, "content": content, **kw}


def _json(payload: object) -> bytes:
    return json.dumps(payload).encode()


GOOD = {"requestId": "bad-1", "roomId": "room-bad", "userId": "user-bad", "content": "hi"}
STREAM = "/chat/messages/stream"

BAD_INPUTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("non-JSON body", _post(STREAM, b"{not json"), 422, "INVALID_PAYLOAD"),
    ("JSON array", _post(STREAM, _json([GOOD])), 422, "INVALID_PAYLOAD"),
    ("content is null", _post(STREAM, _json({**GOOD, "content": None})), 422,
     "INVALID_PAYLOAD"),
    ("missing field", _post(STREAM, _json({k: v for k, v in GOOD.items() if k != "roomId"})),
     422, "INVALID_PAYLOAD"),
    ("content is a number", _post(STREAM, _json({**GOOD, "content": 42})), 422,
     "INVALID_PAYLOAD"),
    ("requestId has a space", _post(STREAM, _json({**GOOD, "requestId": "a b"})), 422,
     "INVALID_PAYLOAD"),
    ("userId too long", _post(STREAM, _json({**GOOD, "userId": "u" * 129})), 422,
     "INVALID_PAYLOAD"),
    ("empty content", _post(STREAM, _json({**GOOD, "content": ""})), 400, "EMPTY_MESSAGE"),
    ("blank content", _post("/chat/messages", _json({**GOOD, "content": " \n\t"})), 400,
     "EMPTY_MESSAGE"),
    ("over-long content", _post(STREAM, _json({**GOOD, "content": "x" * (MAX_CONTENT_CHARS + 1)})),
     413, "MESSAGE_TOO_LONG"),
    ("oversized body", _post(STREAM, _json({**GOOD, "pad": "x" * 200_000})), 413,
     "INVALID_PAYLOAD"),
    ("no token", _post(STREAM, _json(GOOD), headers={}), 401, "UNAUTHORIZED"),
    ("wrong token", _post(STREAM, _json(GOOD), headers={"Authorization": "Bearer nope"}), 401,
     "UNAUTHORIZED"),
    ("resume bad Last-Event-ID", {"method": "GET", "path": "/chat/messages/stream/r-x",
     "headers": {**AUTH, "Last-Event-ID": "three"}}, 422, "INVALID_PAYLOAD"),
    ("resume unknown request", {"method": "GET", "path": "/chat/messages/stream/r-unknown"},
     404, "NOT_FOUND"),
    ("resume bad requestId", {"method": "GET", "path": "/chat/messages/stream/a%20b"}, 422,
     "INVALID_PAYLOAD"),
    ("cancel unknown request", _post("/chat/messages/r-unknown/cancel"), 404, "NOT_FOUND"),
    ("cancel body not JSON", _post("/chat/messages/r-unknown/cancel", b"{"), 422,
     "INVALID_PAYLOAD"),
    ("history limit 0", {"method": "GET", "path": "/chat/rooms/room-bad/messages?limit=0"}, 422,
     "INVALID_PAYLOAD"),
    ("unknown route", {"method": "GET", "path": "/nope"}, 404, "NOT_FOUND"),
]  # fmt: skip


async def test_bad_input_gets_4xx_with_code_and_never_reaches_the_model(
    backend: Backend,
) -> None:
    calls_before = backend.model_calls()
    failures = []
    async with httpx.AsyncClient(base_url=backend.url, timeout=10) as client:
        for name, req, status, code in BAD_INPUTS:
            resp = await client.request(
                req["method"],
                req["path"],
                content=req.get("content"),
                headers=req.get("headers", AUTH),
            )
            reply = resp.json()
            if (resp.status_code, reply.get("code")) != (status, code) or not reply.get("message"):
                failures.append((name, resp.status_code, reply))
    assert not failures
    assert len(BAD_INPUTS) >= 10
    assert backend.model_calls() == calls_before


@pytest.mark.parametrize("field", ["content", "requestId"])
async def test_validation_messages_never_echo_the_input(backend: Backend, field: str) -> None:
    secret = "s3cr3t value with spaces"
    async with backend.client() as client:
        resp = await client.post(STREAM, json={**GOOD, field: [secret]})
    assert resp.status_code == 422
    assert secret not in resp.text
