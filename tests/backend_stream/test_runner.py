"""Chunking, timeouts, model failures and retries of one generation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
from redis.asyncio import Redis

from backend_stream.chunk_writer import ChunkWriter
from backend_stream.generation import Generation
from backend_stream.metrics import Metrics
from backend_stream.providers import Delta, ModelRequest
from backend_stream.runner import GenerationRunner
from backend_stream.settings import Settings
from backend_stream.store import GenerationStore, GenKey
from contracts import ChatMessage, Role, SseEvent, StreamStart
from tests.backend_stream.conftest import Backend, body, parse_frames


def chunk_texts(raw: bytes) -> list[str]:
    return [json.loads(f["data"])["chunk"] for f in parse_frames(raw) if f.get("event") == "chunk"]


async def stream(backend: Backend, payload: dict[str, str]) -> bytes:
    async with backend.client() as client:
        resp = await client.post("/chat/messages/stream", json=payload)
        assert resp.status_code == 200, resp.text
        return resp.content


async def test_first_token_is_flushed_alone_and_fast_tokens_are_coalesced(
    backend: Backend,
) -> None:
    paced = chunk_texts(await stream(backend, body("steady [[tps=50]] [[tokens=20]]")))
    burst = chunk_texts(await stream(backend, body("burst [[tps=2000]] [[tokens=300]]")))
    slow = chunk_texts(await stream(backend, body("paced [[tps=10]] [[tokens=5]]")))
    assert len(paced[0].split()) == 1, "the first token goes out at once, not after a window"
    assert len("".join(paced).split()) == 20
    assert len(paced) < 20, "tokens 20 ms apart share 30 ms flush windows"
    assert len("".join(burst).split()) == 300
    assert len(burst) < 60, f"300 tokens in ~150 ms must coalesce: {len(burst)} chunks"
    assert len(slow) == 5, "tokens 100 ms apart are each their own chunk"


@pytest.mark.parametrize(
    ("directive", "code", "chunks"),
    [
        ("[[fail=hang]]", "MODEL_TIMEOUT", 0),
        ("[[stall_after=2]]", "STREAM_TIMEOUT", 2),
        ("[[fail_after=3]] [[tps=50]]", "MODEL_ERROR", 3),
    ],
)
async def test_timeouts_and_model_errors_end_the_stream_with_a_contract_error(
    backend: Backend, directive: str, code: str, chunks: int
) -> None:
    payload = body(f"trouble {directive}")
    raw = await stream(backend, payload)
    frames = parse_frames(raw)
    assert frames[0]["event"] == "start"
    assert len(chunk_texts(raw)) == chunks
    assert frames[-1]["event"] == "error"
    error = json.loads(frames[-1]["data"])
    assert error == {"code": code, "message": error["message"], "retryable": True}
    async with backend.client() as client:
        hist = (await client.get(f"/chat/rooms/{payload['roomId']}/messages")).json()
    assert [m["role"] for m in hist["messages"]] == ["user"], "no assistant message on failure"


async def test_rate_limit_before_start_is_http_429_with_retry_after(backend: Backend) -> None:
    async with backend.client() as client:
        streamed = await client.post("/chat/messages/stream", json=body("hi [[fail=429]]"))
        completed = await client.post("/chat/messages", json=body("hi [[fail=429]]"))
    for resp in (streamed, completed):
        assert resp.status_code == 429
        assert resp.json()["code"] == "RATE_LIMITED"
        assert int(resp.headers["retry-after"]) >= 1


async def test_retry_after_a_failure_reuses_ids_and_stores_one_user_message(
    backend: Backend,
) -> None:
    payload = body("flaky [[fail=500]]")
    calls_before = backend.model_calls()
    async with backend.client() as client:
        failed = await client.post("/chat/messages/stream", json=payload)
        retried = await client.post("/chat/messages", json={**payload, "content": "flaky"})
        hist = (await client.get(f"/chat/rooms/{payload['roomId']}/messages")).json()
    assert (failed.status_code, failed.json()["code"]) == (502, "MODEL_ERROR")
    assert retried.status_code == 200
    assert backend.model_calls() == calls_before + 2
    assert [m["role"] for m in hist["messages"]] == ["user", "assistant"]
    assert hist["messages"][1]["id"] == retried.json()["messageId"]


class _EndlessProvider:
    """Sends a token every 50 ms forever: only the total budget can stop it."""

    name = "endless"

    async def open_stream(self, request: ModelRequest) -> AsyncGenerator[Delta, None]:
        return self._tokens()

    async def _tokens(self) -> AsyncGenerator[Delta, None]:
        while True:
            await asyncio.sleep(0.05)
            yield Delta(text=" tick")

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_total_timeout_ends_an_endless_generation_with_stream_timeout(redis: Redis) -> None:
    settings = Settings(total_timeout_s=0.6, idle_timeout_s=5, first_token_timeout_s=5)
    store = GenerationStore(redis, buffer_ttl_s=60, idempotency_ttl_s=60, history_cap=10)
    writer = ChunkWriter(redis)
    writer.start()
    runner = GenerationRunner(
        store=store,
        writer=writer,
        provider=_EndlessProvider(),
        settings=settings,
        metrics=Metrics(),
    )
    key = GenKey("u-total", f"r-{time.monotonic_ns()}")
    user = ChatMessage(
        id="u", request_id=key.request_id, role=Role.USER, content="hi", created_at="t"
    )
    claim = await store.claim(
        key,
        {"state": "running", "attempt": "1", "messageId": "m"},
        room_id=f"room-t-{key.request_id}",
        user_message=user,
        history_messages=0,
        character_id=None,
    )
    start = StreamStart(
        request_id=key.request_id,
        room_id=f"room-t-{key.request_id}",
        message_id="m",
        user_message_id="u",
    )
    assert claim.token is not None  # a free room: the claim took its lock
    gen = Generation(
        key=key, attempt=1, start=start, received_at=time.monotonic(), token=claim.token
    )
    began = time.monotonic()
    runner.start()
    gen.task = asyncio.create_task(runner.run(gen, user, claim, time.monotonic()))
    await asyncio.wait_for(gen.task, 10)
    await runner.aclose()
    assert gen.terminal is not None and gen.terminal.kind is SseEvent.ERROR
    assert gen.terminal.payload is not None
    assert gen.terminal.payload["code"] == "STREAM_TIMEOUT"
    assert 0.5 < time.monotonic() - began < 5
    assert len(gen.chunks) >= 2
    meta = await store.get_meta(key)
    await writer.aclose()
    assert meta["state"] == "failed" and meta["retryable"] == "1"
    entries = await store.read_buffer(key, 1, "0-0", block_ms=None, count=10_000)
    assert [f["t"] for _, f in entries] == ["c"] * len(gen.chunks) + ["error"]
