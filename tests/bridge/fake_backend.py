"""A scriptable backend that misbehaves at the wire, served by a real uvicorn on loopback.

It speaks CONTRACT.md section 2 (same paths, bodies, SSE framing) and lets a test script the
faults: an HTTP status before ``start``, a cut after N chunks (the connection is dropped
mid-body), duplicate or skipped ``seq``, an ``event: error``, a stall before the first chunk,
and separately whether resume (``GET .../stream/{id}``) and complete (``POST /chat/messages``)
work. Every request is recorded for assertions (headers, query, body).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn

from contracts.redis_server import free_port

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

TOKEN = "fake-backend-token"


class CutConnection(Exception):
    """Raised inside the ASGI app: uvicorn drops the connection mid-body."""


@dataclass
class Script:
    """How the fake answers; one script for every request of a test."""

    chunks: list[str] = field(default_factory=lambda: ["Hel", "lo", ", ", "wor", "ld"])
    stream_status: int = 200  # non-200: answered before start, JSON {code, message}
    stream_code: str = "BACKEND_UNAVAILABLE"
    stream_retry_after: str | None = None  # the refusal's Retry-After header
    stream_retryable: bool | None = None  # the refusal body's "retryable" (None: left out)
    send_start: bool = True
    cut_after: int | None = None  # first stream: drop the connection after N chunks
    cut_every_stream: bool = False  # resumed streams are cut too (a resume that never works)
    duplicate_seqs: frozenset[int] = frozenset()  # send these chunks twice
    skip_seq: int | None = None  # first stream: leave out this seq (a gap)
    error_after: int | None = None  # send `event: error` after N chunks
    error_code: str = "MODEL_ERROR"
    error_retryable: bool = True
    chunk_delay_s: float = 0.0
    first_chunk_delay_s: float = 0.0
    resume_status: int = 200
    complete_status: int = 200
    complete_delay_s: float = 0.0
    complete_content: str | None = None  # default: the chunks joined
    end_content: str | None = None  # the stream's `end` content; default: the chunks joined
    message_id: str = "m-1"
    user_message_id: str = "u-1"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, list[str]]
    body: dict[str, Any] | None


class FakeBackend:
    """``async with FakeBackend(script) as fake:`` -> ``fake.url``; ``fake.requests``."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.port = free_port()
        self.requests: list[Recorded] = []
        self.cancelled: set[str] = set()
        self._streams_opened = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self, method: str, prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def completes(self) -> list[Recorded]:
        """The fallback / complete-path calls (``POST /chat/messages``)."""
        return [r for r in self.requests if r.method == "POST" and r.path == "/chat/messages"]

    async def __aenter__(self) -> FakeBackend:
        config = uvicorn.Config(
            self._app,
            host="127.0.0.1",
            port=self.port,
            lifespan="off",
            interface="asgi3",
            log_level="critical",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:  # noqa: ASYNC110 - uvicorn has no started event
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._task is not None
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 10)

    # ---- ASGI -----------------------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = parse_qs(scope.get("query_string", b"").decode())
        parsed = json.loads(body) if body else None
        path, method = scope["path"], scope["method"]
        self.requests.append(Recorded(method, path, headers, query, parsed))
        if path in ("/healthz", "/readyz"):
            return await _json(send, 200, {"status": "ok"})
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return await _json(send, 401, {"code": "UNAUTHORIZED", "message": "token"})
        if method == "POST" and path == "/chat/messages/stream":
            return await self._stream(send, parsed or {}, resume_after=None)
        if method == "GET" and path.startswith("/chat/messages/stream/"):
            if self.script.resume_status != 200:
                code = "NOT_FOUND" if self.script.resume_status == 404 else "BACKEND_UNAVAILABLE"
                return await _json(send, self.script.resume_status, {"code": code, "message": "x"})
            last = headers.get("last-event-id")
            request = {"requestId": path.rsplit("/", 1)[-1]}
            return await self._stream(send, request, resume_after=int(last) if last else -1)
        if method == "POST" and path.endswith("/cancel"):
            request_id = path.split("/")[-2]
            self.cancelled.add(request_id)
            reply = {"ok": True, "requestId": request_id, "status": "cancelling"}
            return await _json(send, 200, reply)
        if method == "POST" and path == "/chat/messages":
            return await self._complete(send, parsed or {})
        await _json(send, 404, {"code": "NOT_FOUND", "message": "no route"})

    async def _stream(self, send: Send, request: dict[str, Any], resume_after: int | None) -> None:
        s = self.script
        first = resume_after is None
        if first and s.stream_status != 200:
            body: dict[str, Any] = {"code": s.stream_code, "message": "down"}
            if s.stream_retryable is not None:
                body["retryable"] = s.stream_retryable
            extra = (
                ()
                if s.stream_retry_after is None
                else ((b"retry-after", s.stream_retry_after.encode()),)
            )
            return await _json(send, s.stream_status, body, extra)
        self._streams_opened += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        rid = request.get("requestId", "r")
        if s.send_start:
            start = {
                "requestId": rid,
                "roomId": request.get("roomId", "room"),
                "messageId": s.message_id,
                "userMessageId": s.user_message_id,
            }
            await _event(send, "start", start)
        if s.first_chunk_delay_s:
            await asyncio.sleep(s.first_chunk_delay_s)
        begin = 0 if first else (resume_after or -1) + 1
        sent = 0
        for seq in range(begin, len(s.chunks)):
            if rid in self.cancelled:
                return await self._end(send, "".join(s.chunks[:seq]), "cancelled")
            if first and s.cut_after is not None and sent >= s.cut_after:
                raise CutConnection()
            if not first and s.cut_every_stream and sent >= 1:
                raise CutConnection()
            if s.error_after is not None and seq >= s.error_after:
                err = {"code": s.error_code, "message": "boom", "retryable": s.error_retryable}
                await _event(send, "error", err)
                return await send({"type": "http.response.body", "body": b""})
            if first and seq == s.skip_seq:
                continue
            await _event(send, "chunk", {"seq": seq, "chunk": s.chunks[seq]}, event_id=seq)
            if seq in s.duplicate_seqs:
                await _event(send, "chunk", {"seq": seq, "chunk": s.chunks[seq]}, event_id=seq)
            sent += 1
            if s.chunk_delay_s:
                await asyncio.sleep(s.chunk_delay_s)
        await self._end(send, "".join(s.chunks) if s.end_content is None else s.end_content, "stop")

    async def _end(self, send: Send, content: str, reason: str) -> None:
        end = {
            "messageId": self.script.message_id,
            "content": content,
            "finishReason": reason,
            "usage": {"promptTokens": 3, "completionTokens": 5, "totalTokens": 8},
            "latency": {"totalMs": 1.0},
        }
        await _event(send, "end", end)
        await send({"type": "http.response.body", "body": b""})

    async def _complete(self, send: Send, request: dict[str, Any]) -> None:
        s = self.script
        if s.complete_delay_s:
            await asyncio.sleep(s.complete_delay_s)
        if s.complete_status != 200:
            err = {"code": "BACKEND_UNAVAILABLE", "message": "down"}
            return await _json(send, s.complete_status, err)
        content = s.complete_content if s.complete_content is not None else "".join(s.chunks)
        reply = {
            "requestId": request.get("requestId"),
            "roomId": request.get("roomId"),
            "messageId": s.message_id,
            "userMessageId": s.user_message_id,
            "content": content,
            "finishReason": "stop",
            "usage": {"promptTokens": 3, "completionTokens": 5, "totalTokens": 8},
            "latency": {"totalMs": 2.0},
        }
        await _json(send, 200, reply)


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


async def _json(
    send: Send, status: int, payload: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _event(send: Send, name: str, data: dict[str, Any], event_id: int | None = None) -> None:
    frame = "" if event_id is None else f"id: {event_id}\n"
    frame += f"event: {name}\ndata: {json.dumps(data)}\n\n"
    await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})
