"""The backend's SSE endpoint as a target: the no-bridge baseline (``--direct``).

Each request is one ``POST /chat/messages/stream`` read to its end. The backend's ``start`` event
plays the part of the bridge's accepted ack (the bridge acks on ``start`` too, CONTRACT.md 1), its
chunks and ``end``/``error`` map one to one, and there is no done ack. An HTTP error before the
stream is a rejection with the body's code; a refused TCP connection is a rejection with code
``CONNECT_FAILED``; a connection that ends before ``end``/``error`` is a disconnect.

A minimal SSE line parser is used instead of httpx-sse so that thousands of concurrent streams share
one aiohttp connection pool and one event loop with the Socket.IO target (same client stack, same
costs, a fair comparison).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from loadtest.record import RequestTracker
from loadtest.runner import ConnectStats, TargetHooks
from loadtest.tokens import User

__all__ = ["SseSettings", "SseTarget"]

DEFAULT_BACKEND_TOKEN = "dev-backend-token"


@dataclass(frozen=True, kw_only=True)
class SseSettings:
    prompt: str
    backend_token: str = DEFAULT_BACKEND_TOKEN
    connect_timeout_s: float = 10.0


class SseTarget:
    """POSTs each request to the backend and reads its event stream."""

    name = "direct"

    def __init__(self, url: str, settings: SseSettings) -> None:
        self.url = url.rstrip("/") + "/chat/messages/stream"
        self.settings = settings
        self.connect = ConnectStats()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    async def open(self, users: Sequence[User], hooks: TargetHooks) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.settings.backend_token}"},
        )
        for user in users:
            hooks.user_ready(user.index)

    async def start(self, tracker: RequestTracker, user: User) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks[tracker.record.request_id] = task
        try:
            await self._stream(tracker, user)
        except asyncio.CancelledError:
            if not tracker.finished:  # cancelled by close(): the run is over
                tracker.abandon()
            raise
        finally:
            self._tasks.pop(tracker.record.request_id, None)

    async def _stream(self, tracker: RequestTracker, user: User) -> None:
        assert self._session is not None
        body = {
            "requestId": tracker.record.request_id,
            "roomId": user.room_id,
            "userId": user.user_id,
            "content": self.settings.prompt,
        }
        tracker.on_sent(time.perf_counter(), expect_done=False)
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    code = await _error_code(resp)
                    tracker.on_ack(time.perf_counter(), ok=False, path=None, code=code)
                    return
                await self._read_events(tracker, resp)
        except aiohttp.ClientConnectorError:
            tracker.on_ack(time.perf_counter(), ok=False, path=None, code="CONNECT_FAILED")
            return
        except (aiohttp.ClientError, OSError):
            pass
        if not tracker.finished:
            tracker.on_disconnect(time.perf_counter())

    async def _read_events(self, tracker: RequestTracker, resp: aiohttp.ClientResponse) -> None:
        event, data = "message", ""
        async for raw in resp.content:
            now = time.perf_counter()
            line = raw.decode().rstrip("\r\n")
            if line:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data = f"{data}\n{value}" if data else value
                continue
            if data:
                _dispatch(tracker, event, data, now)
            if tracker.finished:
                return
            event, data = "message", ""

    def forget(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # finished by the watchdog (timeout, stall): stop reading

    def tick(self, now: float) -> None:
        return None

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._session is not None:
            await self._session.close()


def _dispatch(tracker: RequestTracker, event: str, data: str, now: float) -> None:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        tracker.record.malformed += 1
        return
    if not isinstance(payload, dict):
        tracker.record.malformed += 1
    elif event == "start":
        tracker.on_ack(now, ok=True, path="stream", code=None)
    elif event == "chunk":
        seq, chunk = payload.get("seq"), payload.get("chunk")
        if type(seq) is int and isinstance(chunk, str):
            tracker.on_chunk(now, seq, chunk)
        else:
            tracker.record.malformed += 1
    elif event == "end":
        content = payload.get("content")
        if isinstance(content, str):
            tracker.on_end(now, content)
        else:
            tracker.record.malformed += 1
    elif event == "error":
        tracker.on_error(now, str(payload.get("code")))


async def _error_code(resp: aiohttp.ClientResponse) -> str:
    try:
        body = await resp.json(content_type=None)
    except (aiohttp.ClientError, ValueError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return str(body["code"])
    return f"HTTP_{resp.status}"
