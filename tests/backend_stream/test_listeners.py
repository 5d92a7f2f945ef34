"""Resume after a cut, from the same process and from another replica sharing the Redis."""

from __future__ import annotations

import json

import httpx
import httpx_sse
import pytest

from tests.backend_stream.conftest import Backend, body


async def cut_after_chunk(
    client: httpx.AsyncClient, payload: dict[str, str], last_seq: int
) -> tuple[str, list[dict[str, object]]]:
    """Read the stream until chunk ``last_seq`` then drop the connection."""
    chunks: list[dict[str, object]] = []
    async with httpx_sse.aconnect_sse(
        client, "POST", "/chat/messages/stream", json=payload
    ) as source:
        async for event in source.aiter_sse():
            if event.event == "start":
                message_id = json.loads(event.data)["messageId"]
            if event.event == "chunk":
                assert event.id == str(len(chunks))
                chunks.append(json.loads(event.data))
                if len(chunks) == last_seq + 1:
                    break
    return message_id, chunks


@pytest.mark.parametrize("resume_on", ["same", "other"])
async def test_resume_after_chunk_3_yields_chunks_from_4_and_the_same_content(
    backend: Backend, backend_b: Backend, resume_on: str
) -> None:
    payload = body("resume me [[tps=25]] [[tokens=14]]")
    resumer = backend if resume_on == "same" else backend_b
    async with backend.client() as a, resumer.client() as r:
        message_id, before = await cut_after_chunk(a, payload, last_seq=3)
        async with httpx_sse.aconnect_sse(
            r,
            "GET",
            f"/chat/messages/stream/{payload['requestId']}",
            params={"userId": payload["userId"]},
            headers={"Last-Event-ID": "3"},
        ) as source:
            events = [e async for e in source.aiter_sse()]
    assert events[0].event == "start"
    assert json.loads(events[0].data)["messageId"] == message_id
    after = [json.loads(e.data) for e in events if e.event == "chunk"]
    assert [c["seq"] for c in after] == list(range(4, 4 + len(after)))
    assert after, "the generation was still running: live chunks must follow"
    assert events[-1].event == "end"
    end = json.loads(events[-1].data)
    assert end["content"] == "".join(str(c["chunk"]) for c in before + after)
    assert len(end["content"].split()) == 14


async def test_resume_after_the_end_replays_the_buffer_from_redis(
    backend: Backend, backend_b: Backend
) -> None:
    payload = body("finished [[tokens=6]]")
    async with backend.client() as a, backend_b.client() as b:
        done = (await a.post("/chat/messages", json=payload)).json()
        resp = await b.get(
            f"/chat/messages/stream/{payload['requestId']}", headers={"Last-Event-ID": "1"}
        )
    assert resp.status_code == 200
    text = resp.text
    assert "id: 0\n" not in text and "id: 1\n" not in text
    assert "id: 2\nevent: chunk\n" in text
    assert json.loads(text.rstrip().rsplit("data: ", 1)[1])["content"] == done["content"]


async def test_attach_on_another_replica_before_the_first_token_gets_every_chunk(
    backend: Backend, backend_b: Backend
) -> None:
    payload = body("early attach [[ttft_ms=500]] [[tokens=6]]")
    async with backend.client() as a, backend_b.client() as b:
        async with httpx_sse.aconnect_sse(a, "POST", "/chat/messages/stream", json=payload) as s:
            events = s.aiter_sse()
            assert (await anext(events)).event == "start"
            attached = await b.post("/chat/messages/stream", json=payload)
            original = [e async for e in events]
    frames = attached.text
    end = json.loads(original[-1].data)
    for seq in range(len([e for e in original if e.event == "chunk"])):
        assert f"id: {seq}\nevent: chunk\n" in frames
    assert "event: end" in frames and end["content"] in frames


async def test_resume_on_another_replica_sends_pings_while_the_model_is_silent(
    backend: Backend, backend_b: Backend
) -> None:
    payload = body("quiet [[ttft_ms=900]] [[tokens=3]]")
    async with backend.client() as a, backend_b.client() as b:
        async with httpx_sse.aconnect_sse(a, "POST", "/chat/messages/stream", json=payload) as s:
            events = s.aiter_sse()
            assert (await anext(events)).event == "start"
            resumed = await b.get(
                f"/chat/messages/stream/{payload['requestId']}",
                params={"userId": payload["userId"]},
            )
            _ = [e async for e in events]
    assert ": ping\n\n" in resumed.text
    assert resumed.text.rstrip().split("\n")[-2] == "event: end"
