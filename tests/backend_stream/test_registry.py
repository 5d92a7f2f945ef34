"""Idempotency per (userId, requestId), complete-waits-for-stream, and cancel."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import httpx_sse

from tests.backend_stream.conftest import Backend, body, parse_frames, start_backend


async def read_stream(client: httpx.AsyncClient, payload: dict[str, Any]) -> list[dict[str, str]]:
    resp = await client.post("/chat/messages/stream", json=payload)
    assert resp.status_code == 200, resp.text
    return parse_frames(resp.content)


async def history(client: httpx.AsyncClient, room_id: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/chat/rooms/{room_id}/messages")
    messages: list[dict[str, Any]] = resp.json()["messages"]
    return messages


async def test_double_post_same_request_id_calls_the_model_once_and_stores_once(
    backend: Backend,
) -> None:
    payload = body("double post [[tps=40]] [[tokens=10]]")
    calls_before = backend.model_calls()
    async with backend.client() as client:
        first, second = await asyncio.gather(
            read_stream(client, payload), read_stream(client, payload)
        )
        third = await read_stream(client, payload)  # after the end: replayed from Redis
        messages = await history(client, payload["roomId"])

    assert backend.model_calls() == calls_before + 1
    ends = [json.loads(frames[-1]["data"]) for frames in (first, second, third)]
    starts = [json.loads(frames[0]["data"]) for frames in (first, second, third)]
    assert len({s["messageId"] for s in starts}) == 1
    assert len({s["userMessageId"] for s in starts}) == 1
    assert len({e["content"] for e in ends}) == 1
    assert {e["messageId"] for e in ends} == {starts[0]["messageId"]}
    for frames in (first, second, third):
        chunks = [json.loads(f["data"]) for f in frames if f.get("event") == "chunk"]
        assert [c["seq"] for c in chunks] == list(range(len(chunks)))
        assert "".join(c["chunk"] for c in chunks) == ends[0]["content"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["id"] == starts[0]["messageId"]


async def test_stream_and_complete_on_two_replicas_share_one_generation(
    backend: Backend, backend_b: Backend
) -> None:
    payload = body("two replicas [[tps=40]] [[tokens=8]]")
    calls_before = backend.model_calls() + backend_b.model_calls()
    async with backend.client() as a, backend_b.client() as b:
        frames, complete = await asyncio.gather(
            read_stream(a, payload), b.post("/chat/messages", json=payload)
        )
        messages = await history(a, payload["roomId"])
    assert backend.model_calls() + backend_b.model_calls() == calls_before + 1
    end = json.loads(frames[-1]["data"])
    assert complete.status_code == 200
    assert complete.json()["messageId"] == end["messageId"]
    assert complete.json()["content"] == end["content"]
    assert len(messages) == 2


async def test_complete_request_waits_for_the_in_flight_generation(backend: Backend) -> None:
    payload = body("slow one [[tps=20]] [[tokens=10]]")
    async with backend.client() as client:
        async with httpx_sse.aconnect_sse(
            client, "POST", "/chat/messages/stream", json=payload
        ) as source:
            events = source.aiter_sse()
            start = await anext(events)
            assert start.event == "start"
            first_chunk = await anext(events)
            assert first_chunk.event == "chunk"
            complete = await client.post("/chat/messages", json=payload)
            rest = [e async for e in events]
    assert complete.status_code == 200
    reply = complete.json()
    assert reply["messageId"] == json.loads(start.data)["messageId"]
    assert reply["content"] == json.loads(rest[-1].data)["content"]
    assert len(reply["content"].split()) == 10
    assert reply["finishReason"] == "stop"


async def test_cancel_stores_partial_content_with_finish_reason_cancelled(
    backend: Backend,
) -> None:
    payload = body("cancel me [[tps=10]] [[tokens=50]]")
    async with backend.client() as client:
        async with httpx_sse.aconnect_sse(
            client, "POST", "/chat/messages/stream", json=payload
        ) as source:
            seen = []
            async for event in source.aiter_sse():
                seen.append(event)
                if event.event == "chunk" and json.loads(event.data)["seq"] == 2:
                    cancel = await client.post(
                        f"/chat/messages/{payload['requestId']}/cancel",
                        json={"userId": payload["userId"]},
                    )
                    assert cancel.status_code == 200
                    assert cancel.json() == {
                        "ok": True,
                        "requestId": payload["requestId"],
                        "status": "cancelling",
                    }
        again = await client.post(
            f"/chat/messages/{payload['requestId']}/cancel",
            params={"userId": payload["userId"]},
        )
        messages = await history(client, payload["roomId"])
        complete = await client.post("/chat/messages", json=payload)

    end = json.loads(seen[-1].data)
    assert seen[-1].event == "end"
    assert end["finishReason"] == "cancelled"
    chunks = "".join(json.loads(e.data)["chunk"] for e in seen if e.event == "chunk")
    assert end["content"] == chunks
    assert 3 <= len(end["content"].split()) < 50
    assert again.json()["status"] == "done"
    assert messages[-1]["role"] == "assistant"
    assert messages[-1]["content"] == end["content"]
    assert complete.json()["finishReason"] == "cancelled"
    assert complete.json()["content"] == end["content"]


async def test_cancel_reaches_the_generation_on_another_replica(
    backend: Backend, backend_b: Backend
) -> None:
    payload = body("cross cancel [[tps=10]] [[tokens=50]]")
    async with backend.client() as a, backend_b.client() as b:
        async with httpx_sse.aconnect_sse(a, "POST", "/chat/messages/stream", json=payload) as src:
            events = []
            async for event in src.aiter_sse():
                events.append(event)
                if event.event == "chunk":
                    # No userId: resolved through the requestId index.
                    cancel = await b.post(f"/chat/messages/{payload['requestId']}/cancel")
                    assert cancel.status_code == 200
    assert events[-1].event == "end"
    assert json.loads(events[-1].data)["finishReason"] == "cancelled"


async def test_a_generation_whose_replica_died_is_reported_and_rerun_on_retry(
    redis_url: str, backend_b: Backend
) -> None:
    """A crashed pod must not leave its requestId attached to a generation nobody runs."""
    owner = Backend(start_backend(redis_url, GENERATION_LEASE_S="1", ROOM_LOCK_TTL_S="1"))
    payload = body("doomed [[tps=5]] [[tokens=40]]")
    try:
        async with owner.client() as a:
            async with httpx_sse.aconnect_sse(
                a, "POST", "/chat/messages/stream", json=payload
            ) as source:
                events = source.aiter_sse()
                start = json.loads((await anext(events)).data)
                assert (await anext(events)).event == "chunk"
                owner.proc.kill()
    finally:
        owner.proc.stop()
    async with backend_b.client() as b:
        resumed = await b.get(
            f"/chat/messages/stream/{payload['requestId']}", params={"userId": payload["userId"]}
        )
        assert '"code":"BACKEND_UNAVAILABLE"' in resumed.text
        await asyncio.sleep(1.2)  # the dead owner's lease (and its room lock) lapse
        rerun = await read_stream(b, {**payload, "content": "doomed [[tokens=4]]"})
        messages = await history(b, payload["roomId"])
    assert json.loads(rerun[0]["data"]) == start
    assert rerun[-1]["event"] == "end"
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["id"] == start["messageId"]
