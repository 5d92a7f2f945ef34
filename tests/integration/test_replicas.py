"""Two bridge processes on one Redis with the real backend: rooms spread over both replicas."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.bridge.harness import FAST_ENV, assert_contract_stream, connected, new_id, stream_of

SLOW = "[[tps=25]] [[tokens=40]] tell me a story"


@pytest.fixture
def flags_cli(replicas: tuple[str, str]) -> Iterator[list[str]]:
    """``python -m bridge flags`` against the first replica's operator API (an admin token
    signed with the replicas' JWT_SECRET)."""
    argv = [sys.executable, "-m", "bridge", "flags", "--url", replicas[0]]
    yield argv
    subprocess.run([*argv[:4], "reset", *argv[4:]], env=_cli_env(), check=True)


def _cli_env() -> dict[str, str]:
    return {**os.environ, "JWT_SECRET": FAST_ENV["JWT_SECRET"]}


def _flags(argv: list[str], *args: str) -> str:
    done = subprocess.run(
        [*argv[:4], *args, *argv[4:]], env=_cli_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_room_spread_over_two_replicas_gets_identical_sequences(
    replicas: tuple[str, str],
) -> None:
    one, two = replicas
    user, room, rid = new_id("user"), new_id("room"), new_id("req")
    async with (
        connected(one, user) as sender,
        connected(two, user) as remote,
        connected(two, user) as remote_too,
    ):
        for client in (sender, remote, remote_too):
            assert (await client.call("join_room", {"roomId": room}))["ok"] is True
        payload = {"roomId": room, "content": "hello replicas", "requestId": rid}
        assert (await sender.call("send_message", payload))["ok"] is True
        await sender.wait_for("message_ack")
        await remote.wait_for("ai_message_end")
        await remote_too.wait_for("ai_message_end")
    text = assert_contract_stream(sender, rid, sender=True)
    assert text
    for client in (remote, remote_too):
        assert assert_contract_stream(client, rid, sender=False) == text
        assert stream_of(client, rid) == [
            e for e in stream_of(sender, rid) if e[0] != "message_ack"
        ]


async def test_join_on_other_replica_while_in_flight_replays_then_goes_live(
    replicas: tuple[str, str],
) -> None:
    one, two = replicas
    user, room, rid = new_id("user"), new_id("room"), new_id("req")
    async with connected(one, user) as sender, connected(two, user) as late:
        payload = {"roomId": room, "content": SLOW, "requestId": rid}
        assert (await sender.call("send_message", payload))["ok"] is True
        await sender.wait_for("ai_message_chunk", 3)
        ack = await late.call("join_room", {"roomId": room})
        assert ack["inFlight"] == [rid]
        await sender.wait_for("message_ack", wait_s=20)
        await late.wait_for("ai_message_end")
    events = stream_of(late, rid)
    assert events[0][0] == "ai_message_start"
    chunks = [d for e, d in events if e == "ai_message_chunk"]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    sender_chunks = [d for e, d in stream_of(sender, rid) if e == "ai_message_chunk"]
    assert chunks == sender_chunks
    assert [e for e, _ in events].count("ai_message_end") == 1
    assert events[-1][1]["content"] == "".join(c["chunk"] for c in chunks)


async def test_cancel_through_the_other_replica(replicas: tuple[str, str]) -> None:
    one, two = replicas
    user, room, rid = new_id("user"), new_id("room"), new_id("req")
    async with connected(one, user) as sender, connected(two, user) as other:
        payload = {"roomId": room, "content": SLOW, "requestId": rid}
        assert (await sender.call("send_message", payload))["ok"] is True
        await sender.wait_for("ai_message_chunk", 2)
        assert await other.call("cancel_message", {"requestId": rid}) == {"ok": True}
        await sender.wait_for("message_ack", wait_s=20)
    (end,) = sender.named("ai_message_end")
    assert end["finishReason"] == "cancelled"
    assert assert_contract_stream(sender, rid, sender=True) == end["content"]
    assert sender.named("message_ack")[0]["ok"] is True


async def _path(url: str, user: str) -> str:
    async with connected(url, user) as client:
        ack = await client.call("send_message", {"roomId": new_id("room"), "content": "hi"})
        assert ack["ok"], ack
        await client.wait_for("message_ack")
        return str(client.named("message_ack")[0]["path"])


async def test_flag_change_through_the_cli_is_obeyed_by_every_replica_within_a_second(
    replicas: tuple[str, str], redis_url: str, flags_cli: list[str]
) -> None:
    one, two = replicas
    user = new_id("user")
    assert {await _path(one, user), await _path(two, user)} == {"stream"}
    _flags(flags_cli, "set", "enabled=false")
    changed_at = time.monotonic()
    await asyncio.sleep(1.0)
    assert await _path(two, user) == "complete"
    assert await _path(one, user) == "complete"
    _flags(flags_cli, "set", "enabled=true", "percent=0", f"allow_users={user}")
    await asyncio.sleep(1.0)
    assert await _path(two, user) == "stream"
    assert await _path(one, new_id("someone-else")) == "complete"
    shown = _flags(flags_cli, "show")
    assert f'"{user}"' in shown and '"percent": 0.0' in shown
    assert time.monotonic() - changed_at < 30
