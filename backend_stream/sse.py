"""The SSE response: pre-framed event bytes out; a client that goes away stops the stream.

Do not swap this back for Starlette's ``StreamingResponse`` without re-running
``loadtest/bench_backend.py --tokens 2``. Under uvicorn (ASGI spec 2.3) that class runs the body
in an anyio task group beside a disconnect listener: a task group, a cancel scope and two
anyio-managed tasks per stream, ~5 % of the backend's CPU for short streams in py-spy profiles
(README, "Benchmark"). This class keeps the same contract -- status, headers (``init_headers``:
``text/event-stream; charset=utf-8``), a chunked body, the body iterator closed when the client
disconnects -- with one plain asyncio task waiting on ``receive``. Without that task a dropped
client would only be noticed when its generation ends: uvicorn drops writes to a closed
connection silently.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class SseResponse(Response):
    """``text/event-stream`` of frames that are already SSE-encoded bytes."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[bytes, None], headers: Mapping[str, str]) -> None:
        self.frames = frames
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = _DisconnectWatch(task)
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        watcher.add_done_callback(watch.on_done)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for frame in self.frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Ours (the client left) unless someone else cancelled too (a shutdown).
            if not watch.disconnected or task.uncancel() > 0:
                raise
        finally:
            watch.finished = True
            watcher.cancel()
            await self.frames.aclose()


class _DisconnectWatch:
    __slots__ = ("disconnected", "finished", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.disconnected = False
        self.finished = False

    def on_done(self, watcher: asyncio.Task[None]) -> None:
        if watcher.cancelled() or watcher.exception() is not None or self.finished:
            return
        self.disconnected = True
        self.task.cancel()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
