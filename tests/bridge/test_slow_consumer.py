"""Per-socket output is bounded: a socket that stops reading is disconnected, others are not.

The slow reader is a raw Engine.IO long-polling client that joins a room and then never polls
again, so everything sent to it piles up in its server-side queue.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.bridge.fake_backend import TOKEN, FakeBackend, Script
from tests.bridge.harness import (
    RunningBridge,
    assert_contract_stream,
    connected,
    new_id,
    running_bridge,
    token,
)

BOUND = 20


@pytest.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    async with FakeBackend(Script(chunks=[f"t{i} " for i in range(120)])) as backend:
        yield backend


@pytest.fixture
async def bridge(redis_url: str, fake: FakeBackend) -> AsyncIterator[RunningBridge]:
    env = {"BRIDGE_SOCKET_MAX_QUEUE": str(BOUND), "BRIDGE_SOCKET_DRAIN_GRACE_S": "0.3"}
    async with running_bridge(redis_url, fake.url, TOKEN, env) as running:
        yield running


class PollingClient:
    """Just enough Engine.IO v4 long-polling to connect, join and then stop reading."""

    def __init__(self, base: str) -> None:
        self.http = httpx.AsyncClient(base_url=base, timeout=10)
        self.sid = ""

    async def _get(self) -> httpx.Response:
        return await self.http.get("/socket.io/", params=self._params())

    def _params(self) -> dict[str, str]:
        params = {"EIO": "4", "transport": "polling"}
        if self.sid:
            params["sid"] = self.sid
        return params

    async def _post(self, packet: str) -> None:
        response = await self.http.post("/socket.io/", params=self._params(), content=packet)
        assert response.status_code == 200, response.text

    async def open(self, user: str, room: str) -> None:
        handshake = (await self._get()).text
        assert handshake.startswith("0")
        self.sid = json.loads(handshake[1:])["sid"]
        await self._post("40" + json.dumps({"token": token(user)}))
        assert (await self._get()).text.startswith("40")
        await self._post("420" + json.dumps(["join_room", {"roomId": room}]))
        assert '"ok":true' in (await self._get()).text

    async def poll_status(self) -> tuple[int, str]:
        response = await self._get()
        return response.status_code, response.text

    async def aclose(self) -> None:
        await self.http.aclose()


async def test_socket_that_stops_reading_is_disconnected(bridge: RunningBridge) -> None:
    user, room, rid = new_id("user"), new_id("room"), new_id("req")
    slow = PollingClient(bridge.url)
    try:
        await slow.open(user, room)
        async with connected(bridge.url, user) as sender:
            payload = {"roomId": room, "content": "hi", "requestId": rid}
            assert (await sender.call("send_message", payload))["ok"] is True
            await sender.wait_for("message_ack")
        assert assert_contract_stream(sender, rid, sender=True).count("t") == 120
        for _ in range(100):  # the kick comes one drain grace after the burst
            if bridge.bridge.server.kicks:
                break
            await asyncio.sleep(0.05)
        assert bridge.bridge.server.kicks == 1
        assert bridge.bridge.server.local_members(room) == 0
        status, body = await slow.poll_status()
        # the queue was dropped: at most a disconnect/close, never the 120 chunks
        assert status == 400 or "ai_message_chunk" not in body, (status, body[:200])
        metrics = (await slow.http.get("/metrics")).text
        assert "bridge_slow_consumer_disconnects 1.0" in metrics
    finally:
        await slow.aclose()


async def test_reader_that_keeps_up_is_not_disconnected(bridge: RunningBridge) -> None:
    user, room, rid = new_id("user"), new_id("room"), new_id("req")
    async with connected(bridge.url, user) as watcher, connected(bridge.url, user) as sender:
        await watcher.call("join_room", {"roomId": room})
        await sender.call("send_message", {"roomId": room, "content": "hi", "requestId": rid})
        await sender.wait_for("message_ack")
        await watcher.wait_for("ai_message_end")
    assert bridge.bridge.server.kicks == 0
    assert assert_contract_stream(watcher, rid, sender=False).count("t") == 120
