"""Flag evaluation, the sticky hash bucket, the Redis overrides and the rollout share."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from bridge.flags import BUCKETS, FLAGS_KEY, FlagStore, bucket, decide, validate_changes
from bridge.settings import FlagDefaults

USERS = [f"user-{i}" for i in range(1000)]
VECTORS = [3220, 8722, 4154, 6949]  # computed by hand with hashlib from the README's formula


def _streamed(flags: FlagDefaults) -> set[str]:
    return {u for u in USERS if decide(flags, u, ()).streaming}


def test_bucket_is_the_documented_hash_with_known_values() -> None:
    """The documented bucket (bridge/README.md "Rollout"): sha256("chat-streaming:" + userId),
    first 8 bytes big-endian, mod 10,000. Fixed vectors: another replica, language or release
    must put each user where these are."""
    assert all(0 <= bucket(u) < BUCKETS for u in USERS)
    assert [bucket(u) for u in ("alice", "bob", "user-0", "user-999")] == VECTORS


def test_decisions_are_the_same_in_every_process() -> None:
    """Two processes with different hash seeds (two replicas) stream the same users: nothing in
    the decision may depend on ``hash()``, set order or process state."""
    code = (
        "from bridge.flags import decide; from bridge.settings import FlagDefaults;"
        "f = FlagDefaults(percent=37.5, allow_roles=frozenset({'a', 'b', 'c'}));"
        "print(''.join('1' if decide(f, f'user-{i}', ('x', 'b')).streaming else '0'"
        " for i in range(1000)))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        for seed in ("1", "2")
    }  # fmt: skip
    assert len(runs) == 1
    here = "".join("1" if _decide(u) else "0" for u in USERS)
    assert runs == {here}


def _decide(user: str) -> bool:
    flags = FlagDefaults(percent=37.5, allow_roles=frozenset({"a", "b", "c"}))
    return decide(flags, user, ("x", "b")).streaming


def test_rollout_share_at_25_percent_is_within_3_points() -> None:
    share = len(_streamed(FlagDefaults(percent=25))) / len(USERS)
    assert 0.22 <= share <= 0.28, share


def test_users_streamed_at_25_stay_streamed_at_50_and_100() -> None:
    at_25, at_50 = _streamed(FlagDefaults(percent=25)), _streamed(FlagDefaults(percent=50))
    assert at_25 < at_50
    assert 0.47 <= len(at_50) / len(USERS) <= 0.53
    assert _streamed(FlagDefaults(percent=100)) == set(USERS)
    assert _streamed(FlagDefaults(percent=0)) == set()


def test_precedence_kill_switch_deny_allow_percent() -> None:
    flags = FlagDefaults(
        percent=0, allow_users=frozenset({"vip"}), allow_roles=frozenset({"internal"}),
        deny_users=frozenset({"vip-denied"}),
    )  # fmt: skip
    assert decide(flags, "vip", ()).reason == "allow_user"
    assert decide(flags, "staff", ("internal",)).reason == "allow_role"
    assert decide(flags, "someone", ("member",)).streaming is False
    denied = FlagDefaults(percent=100, deny_users=frozenset({"x"}), allow_users=frozenset({"x"}))
    assert decide(denied, "x", ()).reason == "denied"
    killed = FlagDefaults(enabled=False, allow_users=frozenset({"vip"}))
    assert decide(killed, "vip", ("internal",)).reason == "kill_switch"


@pytest.mark.parametrize(
    "changes",
    [{"percent": "101"}, {"percent": "abc"}, {"enabled": "maybe"}, {"colour": "red"}],
)
def test_invalid_changes_are_refused(changes: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        validate_changes(changes)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    await client.delete(FLAGS_KEY)
    yield client
    await client.delete(FLAGS_KEY)
    await client.aclose()


async def test_store_overrides_env_defaults_and_reset_restores_them(redis: Redis) -> None:
    store = FlagStore(redis, FlagDefaults(percent=10), refresh_s=0.05)
    assert (await store.load()).percent == 10
    flags = await store.set({"percent": "25", "allow_roles": "internal, admin", "enabled": "off"})
    assert (flags.percent, flags.allow_roles, flags.enabled) == (
        25.0, frozenset({"internal", "admin"}), False,
    )  # fmt: skip
    assert (await store.reset()).percent == 10


async def test_malformed_field_in_redis_keeps_its_default(redis: Redis) -> None:
    await redis.hset(FLAGS_KEY, mapping={"percent": "lots", "fallback": "false"})
    flags = await FlagStore(redis, FlagDefaults(percent=5), refresh_s=0.05).load()
    assert (flags.percent, flags.fallback) == (5, False)


async def test_poller_sees_a_change_within_a_second(redis: Redis) -> None:
    watcher = FlagStore(redis, FlagDefaults(), refresh_s=0.2)
    task = asyncio.create_task(watcher.poll_forever())
    try:
        await asyncio.sleep(0.1)
        writer = FlagStore(redis, FlagDefaults(), refresh_s=0.2)
        await writer.set({"percent": str(uuid.uuid4().int % 90)})
        expected = writer.current.percent
        await asyncio.sleep(1.0)
        assert watcher.current.percent == expected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
