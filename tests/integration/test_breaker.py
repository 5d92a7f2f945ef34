"""The per-replica breaker (CONTRACT.md section 5) on two real bridge processes, the real backend
and a real Redis: it opens on the replica whose stream path fails, sends that replica's new
messages to the complete path (the room still gets its answer), and closes after its probes.

Replica A's stream path is made to fail with the scripted model's ``[[ttft_ms=N]]`` directive
and A's first-chunk timeout below N: the stream opens, no chunk comes in time, A falls back to
``POST /chat/messages`` (which attaches to the same generation and succeeds), so each such
message ends ``ok`` on the fallback path: bad for A's breaker. B has the default first-chunk
timeout of the integration suite and serves normal messages.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from bridge.breaker import read_breakers
from tests.bridge.harness import connected, new_id
from tests.integration.conftest import bridge_env
from tests.support.procs import ServerProcess

OPEN_S = 4.0
PROBES = 2
BREAKER_ENV = {
    "BRIDGE_BREAKER_WINDOW_S": "10",
    "BRIDGE_BREAKER_MIN_REQUESTS": "5",
    "BRIDGE_BREAKER_FAILURE_RATIO": "0.2",
    "BRIDGE_BREAKER_OPEN_S": str(OPEN_S),
    "BRIDGE_BREAKER_PROBES": str(PROBES),
}
BROKEN = "[[ttft_ms=1500]] a stream whose first chunk comes too late for replica A"
SLOW = "[[tps=20]] [[tokens=20]] a probe that takes about a second"
METRIC = re.compile(r'^bridge_breaker_open\{replica="([^"]+)"\} (\S+)$', re.MULTILINE)


@pytest.fixture(scope="module")
def pair(redis_url: str, backend: ServerProcess) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = {**bridge_env(redis_url, backend), **BREAKER_ENV}
    with (
        ServerProcess.python_module(
            "bridge", env={**env, "BRIDGE_FIRST_CHUNK_TIMEOUT_S": "0.5"}
        ) as a,
        ServerProcess.python_module("bridge", env=env) as b,
    ):
        yield a, b


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def breaker_metric(proc: ServerProcess) -> tuple[str, float]:
    """(replica id, value) of the replica's ``bridge_breaker_open`` series."""
    text = httpx.get(f"{proc.url}/metrics", timeout=5).text
    (series,) = METRIC.findall(text)
    return series[0], float(series[1])


async def states(redis: Redis, *ids: str) -> dict[str, Any]:
    return {s["id"]: s for s in await read_breakers(redis) if s["id"] in ids}


async def wait_state(redis: Redis, replica: str, state: str, wait_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = (await states(redis, replica)).get(replica, {})
        if seen.get("state") == state:
            return seen
        await asyncio.sleep(0.1)
    raise AssertionError(f"{replica} not {state} in {wait_s}s: {seen}")


async def send(url: str, content: str) -> tuple[str, dict[str, Any], list[tuple[str, Any]]]:
    """One message in a room of its own: (requestId, its accepted ack, the events until the
    sender's message_ack)."""
    user, room, rid = new_id("user"), new_id("room"), new_id("req")
    async with connected(url, user) as client:
        assert (await client.call("join_room", {"roomId": room}))["ok"] is True
        payload = {"roomId": room, "content": content, "requestId": rid}
        ack = await client.call("send_message", payload)
        assert ack["ok"] is True, ack
        await client.wait_for("message_ack", wait_s=20)
        return rid, ack, list(client.events)


def final(events: list[tuple[str, Any]]) -> dict[str, Any]:
    (done,) = [data for name, data in events if name == "message_ack"]
    assert isinstance(done, dict)
    return done


def logged(proc: ServerProcess, request_id: str, event: str) -> dict[str, Any]:
    for line in proc.output().splitlines():
        if request_id in line and event in line:
            record: dict[str, Any] = json.loads(line)
            if record.get("event") == event and record.get("requestId") == request_id:
                return record
    raise AssertionError(f"no {event} of {request_id} in the log")


async def test_the_breaker_opens_on_the_failing_replica_only_and_closes_after_its_probes(
    pair: tuple[ServerProcess, ServerProcess], redis: Redis
) -> None:
    a, b = pair
    (id_a, open_a), (id_b, open_b) = breaker_metric(a), breaker_metric(b)
    assert id_a != id_b and (open_a, open_b) == (0.0, 0.0)  # exported from the start

    # A's stream path fails (every message falls back, and gets its answer); B's works.
    broken = asyncio.gather(*(send(a.url, BROKEN) for _ in range(6)))
    healthy = asyncio.gather(*(send(b.url, f"hello {i}") for i in range(6)))
    for _, ack, events in await broken:
        assert ack["path"] == "stream"
        assert final(events)["ok"] is True and final(events)["path"] == "fallback"
    for _, _, events in await healthy:
        assert final(events)["ok"] is True and final(events)["path"] == "stream"

    opened = await wait_state(redis, id_a, "open", 3.0)
    assert opened["total"] >= 5 and opened["bad"] >= 5
    assert breaker_metric(a) == (id_a, 1.0)
    assert breaker_metric(b) == (id_b, 0.0)
    assert (await states(redis, id_b))[id_b]["state"] == "closed"

    # While open: a normal message to A takes the complete path, and the room gets the answer.
    rid, ack, events = await send(a.url, "hello while the breaker is open")
    assert ack["path"] == "complete" and ack["messageId"] is None
    messages = [data["message"] for name, data in events if name == "new_message"]
    answers = [m for m in messages if m["role"] == "assistant"]
    assert len(answers) == 1 and answers[0]["requestId"] == rid and answers[0]["content"]
    done = final(events)
    assert (done["ok"], done["path"]) == (True, "complete")
    assert logged(a, rid, "request_done")["flag"] == "breaker"
    assert (await states(redis, id_a))[id_a]["state"] == "open"  # still: the ack was no probe

    # After OPEN_S: half open; the next PROBES messages stream (the rest still complete) and,
    # all good, close it.
    await wait_state(redis, id_a, "half_open", OPEN_S + 4.0)
    assert breaker_metric(a) == (id_a, 1.0)
    probes = await asyncio.gather(*(send(a.url, SLOW) for _ in range(PROBES + 1)))
    paths = sorted(final(events)["path"] for _, _, events in probes)
    assert paths == ["complete"] + ["stream"] * PROBES, paths
    assert all(final(events)["ok"] for _, _, events in probes)
    closed = await wait_state(redis, id_a, "closed", 3.0)
    assert closed["total"] == 0  # a closed breaker starts with an empty window
    assert breaker_metric(a) == (id_a, 0.0)
    _, ack, events = await send(a.url, "hello again")
    assert ack["path"] == "stream" and final(events)["path"] == "stream"
    assert breaker_metric(b) == (id_b, 0.0)
