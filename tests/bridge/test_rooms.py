"""Room state in a real Redis: every key the registry writes has an idle expiry, re-armed by use."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from bridge import rooms as rooms_module
from bridge.rooms import HOSTS_TTL_S, RoomRegistry
from tests.bridge.harness import new_id

ROOM_TTL_S = 400  # the owners' refresh by heartbeat is due every 100 s


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def _registry(redis: Redis) -> RoomRegistry:
    return RoomRegistry(
        redis,
        host_id=new_id("host"),
        inflight_ttl_s=120,
        rate_limit=5,
        rate_window_s=60,
        room_ttl_s=ROOM_TTL_S,
    )


async def test_join_begin_and_rate_limit_write_only_keys_that_expire(redis: Redis) -> None:
    registry = _registry(redis)
    room, user = new_id("room"), new_id("user")
    assert await registry.join(room, user) is True
    assert await registry.rate_limited(user) is None
    await registry.begin(room, new_id("req"), user, new_id("msg"))
    await registry.heartbeat()
    owner = f"bridge:room:{room}:owner"
    assert ROOM_TTL_S - 5 < await redis.ttl(owner) <= ROOM_TTL_S
    assert 0 < await redis.ttl(f"bridge:room:{room}:hosts") <= HOSTS_TTL_S
    assert 0 < await redis.ttl(f"bridge:room:{room}:inflight") <= 120
    assert 0 < await redis.ttl(f"bridge:host:{registry.host_id}") <= rooms_module.HEARTBEAT_TTL_S

    await redis.expire(owner, 10)  # a send re-arms the owner's expiry
    await registry.begin(room, new_id("req"), user, new_id("msg"))
    assert await redis.ttl(owner) > ROOM_TTL_S - 5


async def test_the_heartbeat_keeps_rooms_in_use_owned(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members that stay connected without sending keep their room: the heartbeat re-arms
    the hosts sets (here at once: its first beat finds no liveness key of its own) and the
    owners once per refresh period, not every beat."""
    clock = [1000.0]
    monkeypatch.setattr(rooms_module.time, "monotonic", lambda: clock[0])
    registry = _registry(redis)
    room, user = new_id("room"), new_id("user")
    assert await registry.join(room, user) is True
    owner, hosts = f"bridge:room:{room}:owner", f"bridge:room:{room}:hosts"
    await redis.expire(owner, 50)
    await redis.expire(hosts, 5)

    clock[0] += 5  # a beat before the owners' refresh is due
    await registry.heartbeat()
    assert await redis.ttl(hosts) > HOSTS_TTL_S - 5
    assert await redis.ttl(owner) <= 50

    clock[0] += ROOM_TTL_S / 4  # due
    await registry.heartbeat()
    assert await redis.ttl(owner) > ROOM_TTL_S - 5

    await registry.absent(room)  # gone from this replica: no longer re-armed
    await redis.expire(owner, 50)
    clock[0] += ROOM_TTL_S
    await registry.heartbeat()
    assert await redis.ttl(owner) <= 50


async def test_the_heartbeat_rearms_a_room_once_a_third_of_its_ttl_old_or_when_given_up(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not every room on every beat (that cost grew with the users connected, issue 8): a
    room's keys once ``ROOM_REFRESH_S`` old; all at once when this replica's liveness key was
    gone (another replica may have dropped it from the rooms' hosts sets meanwhile)."""
    clock = [1000.0]
    monkeypatch.setattr(rooms_module.time, "monotonic", lambda: clock[0])
    registry = _registry(redis)
    await registry.heartbeat()  # the replica is alive
    room, user = new_id("room"), new_id("user")
    assert await registry.join(room, user) is True
    hosts = f"bridge:room:{room}:hosts"
    await redis.expire(hosts, 30)

    clock[0] += 5
    await registry.heartbeat()
    assert await redis.ttl(hosts) <= 30  # joined 5 s ago: not due

    clock[0] += rooms_module.ROOM_REFRESH_S
    await registry.heartbeat()
    assert await redis.ttl(hosts) > HOSTS_TTL_S - 5  # due

    # Given up for dead (its liveness key expired): another replica dropped it from the room.
    await redis.srem(hosts, registry.host_id)
    await redis.delete(f"bridge:host:{registry.host_id}")
    clock[0] += 5
    await registry.heartbeat()
    assert registry.host_id in await redis.smembers(hosts)
