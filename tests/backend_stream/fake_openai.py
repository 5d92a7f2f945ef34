"""A local chat.completions server speaking the real streaming wire format, under real uvicorn.

The last user message picks the behaviour: ``ok`` (default), ``429``, ``500``, ``malformed``
(a chunk that is not JSON), ``slow`` (headers after 3 s), ``stall`` (two tokens, then silence).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from contracts.redis_server import free_port

TOKENS = ["Hel", "lo", " from", " the", " fake", " model"]


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    obj = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class FakeOpenAI:
    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> FakeOpenAI:
        app = Starlette(routes=[Route("/v1/chat/completions", self._complete, methods=["POST"])])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", ws="none"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        async with asyncio.timeout(10):
            for _ in range(1000):  # uvicorn exposes only a flag
                if self._server.started:
                    break
                await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 10)

    async def _complete(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        mode = body["messages"][-1]["content"]
        if mode == "429":
            return JSONResponse(
                {"error": {"message": "slow down", "type": "rate_limit"}},
                status_code=429,
                headers={"retry-after": "7"},
            )
        if mode == "500":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if mode == "slow":
            await asyncio.sleep(3)
        return StreamingResponse(self._events(mode), media_type="text/event-stream")

    async def _events(self, mode: str) -> AsyncIterator[bytes]:
        yield _chunk({"role": "assistant", "content": ""})
        for i, token in enumerate(TOKENS):
            if mode == "malformed" and i == 2:
                yield b"data: {this is not json\n\n"
                return
            if mode == "stall" and i == 2:
                await asyncio.sleep(30)
            yield _chunk({"content": token})
            await asyncio.sleep(0.005)
        yield _chunk({}, "stop")
        usage = {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}
        yield (
            b"data: "
            + json.dumps(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": "fake-model",
                    "choices": [],
                    "usage": usage,
                }
            ).encode()
            + b"\n\n"
        )
        yield b"data: [DONE]\n\n"
