"""The SSE response: frames out, a dropped client lets go of its stream, shutdowns propagate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from backend_stream.sse import SseResponse
from tests.backend_stream.conftest import Backend, body, metric

ACTIVE_STREAMS = "backend_active_streams"


class FakeClient:
    """ASGI receive/send of one HTTP request whose body has been read."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


async def test_frames_are_sent_then_the_body_ends_and_the_watcher_is_gone() -> None:
    async def frames() -> AsyncGenerator[bytes, None]:
        yield b"event: start\ndata: {}\n\n"
        yield b": ping\n\n"

    client = FakeClient()
    before = asyncio.all_tasks()
    await SseResponse(frames(), {"X-Accel-Buffering": "no"})({}, client.receive, client.send)
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == before
    start, *bodies = client.sent
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"x-accel-buffering", b"no") in start["headers"]
    assert [(m["body"], m["more_body"]) for m in bodies] == [
        (b"event: start\ndata: {}\n\n", True),
        (b": ping\n\n", True),
        (b"", False),
    ]


async def test_a_disconnect_closes_the_frames_and_returns_normally() -> None:
    closed = asyncio.Event()

    async def frames() -> AsyncGenerator[bytes, None]:
        try:
            yield b": ping\n\n"
            await asyncio.sleep(3600)
            yield b"never"
        finally:
            closed.set()

    client = FakeClient()
    response = asyncio.create_task(SseResponse(frames(), {})({}, client.receive, client.send))
    await asyncio.sleep(0.01)
    client.gone.set()
    await asyncio.wait_for(response, 2)
    assert closed.is_set()
    assert [m.get("body") for m in client.sent[1:]] == [b": ping\n\n"]


async def test_a_shutdown_cancel_is_not_swallowed() -> None:
    async def frames() -> AsyncGenerator[bytes, None]:
        yield b": ping\n\n"
        await asyncio.sleep(3600)

    client = FakeClient()
    response = asyncio.create_task(SseResponse(frames(), {})({}, client.receive, client.send))
    await asyncio.sleep(0.01)
    response.cancel()
    with pytest.raises(asyncio.CancelledError):
        await response


async def test_a_client_that_drops_mid_stream_is_let_go_before_its_generation_ends(
    backend: Backend,
) -> None:
    """The disconnect watcher that replaced StreamingResponse's task group: without it a dropped
    client's stream stays open until the generation ends (uvicorn drops the writes silently)."""
    open_before = metric(backend.url, ACTIVE_STREAMS)
    payload = body("a long reply please [[tokens=80]] [[tps=5]]")
    async with (
        backend.client() as client,
        client.stream("POST", "/chat/messages/stream", json=payload) as resp,
    ):
        async for line in resp.aiter_lines():
            if line == "event: chunk":
                break
        assert metric(backend.url, ACTIVE_STREAMS) == open_before + 1
    for _ in range(50):  # the generation runs ~16 s more; the stream must go well before that
        if metric(backend.url, ACTIVE_STREAMS) == open_before:
            break
        await asyncio.sleep(0.1)
    assert metric(backend.url, ACTIVE_STREAMS) == open_before
