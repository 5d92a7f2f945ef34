"""RoomSink on a live bridge: local sockets first, other replicas through Redis, never in between
the terminal event and the sender's ``message_ack``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from bridge.rooms import PREFIX
from tests.bridge.fake_backend import TOKEN, FakeBackend
from tests.bridge.harness import assert_contract_stream, connected, new_id, running_bridge


@pytest.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    async with FakeBackend() as backend:
        yield backend


async def _another_replica_in(redis_url: str, room: str) -> None:
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        await redis.set(f"{PREFIX}host:other-replica", "1", ex=60)
        await redis.sadd(f"{PREFIX}room:{room}:hosts", "other-replica")
    finally:
        await redis.aclose()


async def test_slow_publish_of_the_terminal_does_not_delay_the_senders_message_ack(
    redis_url: str, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 3, overload): with members on another replica, the relay awaited the
    terminal event's Redis publish before the sender's ``message_ack``; under load the publish
    took seconds (and the relay's idle timer could fire in it), so the sender saw
    ``ai_message_end`` and no ``message_ack`` within the load test's 5 s. Here the terminal's
    publish does not finish until the sender has its ``message_ack``: order, not a clock."""
    room, rid = new_id("room"), new_id("req")
    await _another_replica_in(redis_url, room)
    release = asyncio.Event()
    async with running_bridge(redis_url, fake.url, TOKEN) as running:
        server = running.bridge.server
        publish = server.publish
        published: list[str] = []
        terminal_published = asyncio.Event()

        async def gated_publish(room_id: str, event: str, payload: dict[str, Any]) -> None:
            if event in ("ai_message_end", "ai_message_error"):
                await asyncio.wait_for(release.wait(), 30)  # a Redis slow to take it
                terminal_published.set()
            published.append(event)
            await publish(room_id, event, payload)

        monkeypatch.setattr(server, "publish", gated_publish)
        async with connected(running.url, new_id("user")) as client:
            ack = await client.call(
                "send_message", {"roomId": room, "content": "hi", "requestId": rid}
            )
            assert ack["ok"] is True
            await client.wait_for("message_ack", wait_s=20)
            assert not terminal_published.is_set()
            release.set()
            assert_contract_stream(client, rid, sender=True)
            assert client.named("message_ack")[0]["ok"] is True
            await asyncio.wait_for(terminal_published.wait(), 10)
    # the other replica still gets it, the generation's last (presence may follow it)
    assert [e for e in published if e.startswith("ai_")][-1] == "ai_message_end"


async def test_slow_publish_of_chunks_does_not_hold_back_local_sockets(
    redis_url: str, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 3, overload): with presence on another replica (or unknown because
    Redis failed), every chunk awaited its Redis publish before the next one went out, so a
    slow Redis stalled the local sockets too (30 s client timeouts in the load test). Now the
    local sockets get the whole stream while no publish has gone out yet, and the publishes
    follow, in order, once Redis takes them."""
    room, rid = new_id("room"), new_id("req")
    await _another_replica_in(redis_url, room)
    release = asyncio.Event()
    async with running_bridge(redis_url, fake.url, TOKEN) as running:
        server = running.bridge.server
        publish = server.publish
        published: list[str] = []
        all_published = asyncio.Event()

        async def gated_publish(room_id: str, event: str, payload: dict[str, Any]) -> None:
            await asyncio.wait_for(release.wait(), 30)  # a Redis that takes nothing yet
            published.append(event)
            await publish(room_id, event, payload)
            if event == "ai_message_end":
                all_published.set()

        monkeypatch.setattr(server, "publish", gated_publish)
        async with connected(running.url, new_id("user")) as client:
            ack = await client.call(
                "send_message", {"roomId": room, "content": "hi", "requestId": rid}
            )
            assert ack["ok"] is True
            await client.wait_for("message_ack", wait_s=20)
            assert published == []
            assert assert_contract_stream(client, rid, sender=True) == "Hello, world"
            release.set()
            await asyncio.wait_for(all_published.wait(), 10)
    assert [e for e in published if e != "room_event"] == [
        "new_message", "ai_message_start", *["ai_message_chunk"] * 5, "ai_message_end",
    ]  # fmt: skip
