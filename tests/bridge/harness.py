"""Test harness: a real bridge (uvicorn on loopback) in the test's event loop, and a client.

The client is python-socketio's ``AsyncClient`` (a real Socket.IO v4 client over a real socket);
the official JS client is exercised by tests/e2e.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import socketio

from bridge.app import Bridge
from bridge.auth import make_token
from bridge.settings import Settings
from contracts.redis_server import free_port

JWT_SECRET = "test-jwt-secret-0123456789abcdef-0123456789"

FAST_ENV: dict[str, str] = {
    "JWT_SECRET": JWT_SECRET,
    "BRIDGE_CONNECT_TIMEOUT_S": "1",
    "BRIDGE_FIRST_EVENT_TIMEOUT_S": "1.5",
    "BRIDGE_FIRST_CHUNK_TIMEOUT_S": "1.5",
    "BRIDGE_IDLE_TIMEOUT_S": "1.5",
    "BRIDGE_RESUME_TIMEOUT_S": "2",
    "BRIDGE_TOTAL_TIMEOUT_S": "15",
    "BRIDGE_RATE_LIMIT": "1000",
    "BRIDGE_FLAGS_REFRESH_S": "0.2",
}


@dataclass
class RunningBridge:
    url: str
    bridge: Bridge


@asynccontextmanager
async def running_bridge(
    redis_url: str,
    backend_url: str,
    backend_token: str,
    env: Mapping[str, str] | None = None,
    *,
    exit_timeout_s: float = 20,
) -> AsyncIterator[RunningBridge]:
    environ = {
        **FAST_ENV,
        "BACKEND_URL": backend_url,
        "BACKEND_TOKEN": backend_token,
        "REDIS_URL": redis_url,
        "BRIDGE_CHANNEL": f"test-{uuid.uuid4().hex[:8]}",
        **(env or {}),
    }
    bridge = Bridge(Settings.from_env(environ), redis_url=redis_url)
    port = free_port()
    ready = asyncio.Event()

    async def on_ready() -> None:
        ready.set()

    task = asyncio.create_task(bridge.serve("127.0.0.1", port, on_ready=on_ready))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        yield RunningBridge(f"http://127.0.0.1:{port}", bridge)
    finally:
        bridge.request_exit()
        await asyncio.wait_for(task, exit_timeout_s)


def token(user_id: str, roles: list[str] | None = None, ttl_s: int = 600) -> str:
    return make_token(JWT_SECRET, user_id, roles=roles or [], ttl_s=ttl_s)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Client:
    """A Socket.IO client that records every event it receives, in order."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: list[tuple[str, Any]] = []
        self.connect_error: Any = None
        self.disconnected = asyncio.Event()
        self.sio.on("*", self._on_any)
        self.sio.on("connect_error", self._on_connect_error)
        self.sio.on("disconnect", self._on_disconnect)

    async def _on_any(self, event: str, data: Any = None) -> None:
        self.events.append((event, data))

    async def _on_connect_error(self, data: Any = None) -> None:
        # python-socketio hands over the packet ({message, data}); the JS client's err.data is
        # the inner object, which is what the contract specifies.
        self.connect_error = data.get("data") if isinstance(data, dict) else data

    async def _on_disconnect(self, reason: Any = None) -> None:
        self.disconnected.set()

    async def connect(
        self,
        url: str,
        *,
        auth: Any = None,
        headers: dict[str, str] | None = None,
        transports: list[str] | None = None,
    ) -> None:
        await self.sio.connect(
            url,
            auth=auth,
            headers=headers or {},
            transports=transports or ["websocket"],
            wait_timeout=10,
        )

    async def call(self, event: str, data: Any = None, wait_s: float = 15.0) -> Any:
        return await self.sio.call(event, data, timeout=wait_s)

    def named(self, name: str) -> list[Any]:
        return [data for event, data in self.events if event == name]

    def names(self) -> list[str]:
        return [event for event, _ in self.events]

    async def wait_for(self, name: str, count: int = 1, wait_s: float = 15.0) -> list[Any]:
        deadline = time.monotonic() + wait_s
        while len(self.named(name)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} x{count} not received in {wait_s}s: {self.names()}")
            await asyncio.sleep(0.01)
        return self.named(name)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


@asynccontextmanager
async def connected(url: str, user_id: str, **kwargs: Any) -> AsyncIterator[Client]:
    client = Client()
    await client.connect(url, auth={"token": token(user_id, kwargs.pop("roles", None))}, **kwargs)
    try:
        yield client
    finally:
        await client.close()


def stream_of(client: Client, request_id: str) -> list[tuple[str, Any]]:
    """The events of one requestId as seen by ``client`` (new_message included)."""
    picked = []
    for event, data in client.events:
        if not isinstance(data, dict):
            continue
        rid = data.get("requestId") or (data.get("message") or {}).get("requestId")
        if rid == request_id:
            picked.append((event, data))
    return picked


def assert_contract_stream(client: Client, request_id: str, *, sender: bool) -> str:
    """Check CONTRACT.md's ordering for one request on one socket; return the text relayed."""
    events = stream_of(client, request_id)
    names = [e for e, _ in events]
    assert names.count("ai_message_start") == 1, names
    terminals = [n for n in names if n in ("ai_message_end", "ai_message_error")]
    assert len(terminals) == 1, names
    start_at = names.index("ai_message_start")
    assert "new_message" in names[:start_at], names
    chunks = [d for e, d in events if e == "ai_message_chunk"]
    assert [c["seq"] for c in chunks] == list(range(len(chunks))), chunks
    end_at = names.index(terminals[0])
    assert all(start_at < i < end_at for i, n in enumerate(names) if n == "ai_message_chunk")
    acks = [i for i, n in enumerate(names) if n == "message_ack"]
    assert len(acks) == (1 if sender else 0), names
    if sender:
        assert acks[0] > end_at, names
    text = "".join(c["chunk"] for c in chunks)
    if terminals[0] == "ai_message_end":
        end = events[end_at][1]
        assert end["content"] == text, (end["content"], text)
    return text
