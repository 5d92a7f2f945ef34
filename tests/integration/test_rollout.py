"""Staged rollout judged on a real Prometheus (CONTRACT.md sections 4 and 5, issue 10).

Two bridge processes, the real backend, a real Redis, Debian's ``prometheus`` scraping both
bridges every second, and a steady load from real Socket.IO clients. The controller judges every
half second with a short dwell and few samples, so a whole rollout takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from bridge.flags import AUDIT_KEY, FLAGS_KEY, bucket
from bridge.prometheus import LocalPrometheus
from bridge.rollout import LEASE_KEY, ROLLOUT_KEY
from tests.bridge.harness import Client, connected, new_id, token
from tests.integration.conftest import bridge_env
from tests.support.procs import ServerProcess, free_port

EVAL_S = 0.5
DWELL_S = 3
MIN_SAMPLES = 8
ADMIN = {"Authorization": f"Bearer {token('ops-carol', ['admin'])}"}
# 30 tokens at the fast backend's 300/s: the complete path's answer (its TTFT) takes ~130 ms,
# the stream's first chunk ~35 ms, so p95_ttft_vs_complete judges a real difference
HEALTHY = "[[tokens=30]] hello"
FAILING = "[[fail_after=1]] [[tokens=30]] hello"
# Users picked by bucket so every stage of [10, 25, 50, 100] adds some: 4 below 10 %, 4 more
# below 25 %, 4 more below 50 %, 4 above.
RANGES = ((0, 1000), (1000, 2500), (2500, 5000), (5000, 10_000))
PER_RANGE = 4


def pick_users() -> list[str]:
    users: list[str] = []
    for low, high in RANGES:
        found = 0
        n = 0
        while found < PER_RANGE:
            user = f"ro-user-{low}-{n}"
            n += 1
            if low <= bucket(user) < high:
                users.append(user)
                found += 1
    return users


@dataclass
class Stack:
    urls: tuple[str, str]
    procs: list[ServerProcess]
    prometheus: LocalPrometheus
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(redis_url: str, backend: ServerProcess) -> Iterator[Stack]:
    ports = (free_port(), free_port())
    targets = {f"bridge-{i}": f"127.0.0.1:{port}" for i, port in enumerate(ports)}
    with LocalPrometheus(targets, interval_s=1.0, rules=None) as prometheus:
        env = {
            **bridge_env(redis_url, backend),
            "PROMETHEUS_URL": prometheus.url,
            "BRIDGE_ROLLOUT_EVAL_S": str(EVAL_S),
            "CHAT_STREAMING_PERCENT": "0",
            "BRIDGE_CHANNEL": "rollout-test",
        }
        procs = [ServerProcess.python_module("bridge", port=p, env=env) for p in ports]
        for proc in procs:
            proc.start()
        try:
            prometheus.wait_scraping()
            yield Stack((procs[0].url, procs[1].url), procs, prometheus, env)
        finally:
            for proc in procs:
                proc.stop()


@pytest.fixture
async def clean(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.delete(FLAGS_KEY, AUDIT_KEY, ROLLOUT_KEY)
    try:
        yield redis
    finally:
        await redis.delete(FLAGS_KEY, AUDIT_KEY, ROLLOUT_KEY)
        await redis.aclose()


@dataclass
class Sent:
    at: float
    user: str
    path: str  # the accepted ack's path
    ok: bool  # message_ack ok


@dataclass
class Load:
    """Every user on its own socket (alternating replicas), one message at a time."""

    urls: tuple[str, str]
    users: list[str]
    content: str = HEALTHY
    pause_s: float = 0.15
    sent: list[Sent] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _user(self, first: int, user: str) -> None:
        """Sends until stopped; a replica that dies (the lease test) loses its sockets: they
        reconnect to the other one, as socket.io-client would behind a load balancer."""
        index = first
        while not self._stop.is_set():
            room = new_id("ro-room")
            try:
                async with connected(self.urls[index % 2], user) as client:
                    assert (await client.call("join_room", {"roomId": room}))["ok"] is True
                    while not self._stop.is_set():
                        await self._one(client, room, user)
                        await asyncio.sleep(self.pause_s)
            except Exception:  # a dead replica: go on through the other one
                index += 1
                await asyncio.sleep(0.2)

    async def _one(self, client: Client, room: str, user: str) -> None:
        rid = new_id("ro-req")
        at = time.time()
        ack = await client.call(
            "send_message", {"roomId": room, "content": self.content, "requestId": rid}
        )
        if not ack.get("ok"):
            self.sent.append(Sent(at, user, "rejected", False))
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            done = [d for d in client.named("message_ack") if d["requestId"] == rid]
            if done:
                self.sent.append(Sent(at, user, ack["path"], bool(done[0]["ok"])))
                return
            if client.disconnected.is_set():  # its replica was killed: the socket is gone
                self.sent.append(Sent(at, user, "lost", False))
                raise ConnectionError("replica gone")
            await asyncio.sleep(0.01)
        self.sent.append(Sent(at, user, ack["path"], False))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._user(i, user)) for i, user in enumerate(self.users)]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def _admin(url: str, method: str, path: str, body: Any = None, status: int = 200) -> Any:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        reply = await client.request(method, path, json=body, headers=ADMIN)
    assert reply.status_code == status, (path, reply.status_code, reply.text)
    return reply.json()


async def _wait_state(url: str, states: set[str], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    view: Any = None
    while time.monotonic() < deadline:
        view = await _admin(url, "GET", "/admin/rollout")
        if view["state"] in states:
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"rollout not in {states} within {timeout_s}s: {view}")


def _streamed(sent: list[Sent], since: float, until: float) -> set[str]:
    return {s.user for s in sent if since <= s.at < until and s.path == "stream"}


def _seen(sent: list[Sent], since: float, until: float) -> set[str]:
    return {s.user for s in sent if since <= s.at < until}


def _replica_of(url: str) -> str:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    for line in metrics.splitlines():
        if line.startswith("bridge_breaker_open{"):
            return line.split('replica="', 1)[1].split('"', 1)[0]
    raise AssertionError("no bridge_breaker_open series")


async def test_auto_rollout_walks_every_stage_and_users_stay_streamed(
    stack: Stack, clean: Redis
) -> None:
    users = pick_users()
    async with Load(stack.urls, users).running() as load:
        await asyncio.sleep(2)  # every user has sent on the complete path (0 %)
        start = {"plan": [10, 25, 50, 100], "dwellS": DWELL_S, "minSamples": MIN_SAMPLES,
                 "auto": True, "reason": "issue 10 walk"}  # fmt: skip
        view = await _admin(stack.urls[0], "POST", "/admin/rollout/start", start)
        assert (view["state"], view["percent"]) == ("running", 10)
        # the lease holder dies after the first promotion; the other replica takes over
        await _wait_stage(stack.urls[1], 1, 40)
        holder = str(await clean.get(LEASE_KEY) or "")
        victim = next(i for i, u in enumerate(stack.urls) if holder.startswith(_replica_of(u)))
        survivor = stack.urls[1 - victim]
        stack.procs[victim].kill()
        view = await _wait_state(survivor, {"done", "rolled_back"}, 90)
        assert view["state"] == "done", view["history"][-1]
        # the dead replica comes back on its port: the rollout is where it was (done)
        await asyncio.to_thread(stack.procs[victim].start)
        assert (await _admin(stack.urls[victim], "GET", "/admin/rollout"))["state"] == "done"
        await asyncio.sleep(1.5)
        stop_at = time.time()

    audit = (await _admin(survivor, "GET", "/admin/audit?limit=50"))[::-1]
    promotes = [e for e in audit if e["action"] == "promote"]
    assert [e["before"]["stage"] for e in promotes] == [0, 1, 2], audit  # none twice
    assert all(e["actor"].startswith("controller:") for e in promotes)
    assert all(not e.get("forced") for e in promotes)
    assert len({e["actor"] for e in promotes}) == 2  # the survivor took over from the victim
    # each stage's streamed users: exactly those whose bucket is below the stage's percentage
    # (sticky: a promotion only adds users), judged on sends well inside the stage
    times = [h["at_s"] for h in view["history"] if h["action"] in ("start", "promote")]
    bounds = [*times, stop_at]
    previous: set[str] = set()
    shares = []
    for stage, percent in enumerate([10, 25, 50, 100]):
        since, until = bounds[stage] + 1.5, bounds[stage + 1] - 0.2
        seen = _seen(load.sent, since, until)
        streamed = _streamed(load.sent, since, until)
        expected = {u for u in users if bucket(u) < percent * 100}
        assert streamed == expected & seen, (percent, streamed, expected)
        assert len(seen) >= len(users) // 2, (percent, seen)
        assert previous & seen <= streamed  # sticky: nobody left the stream path
        previous |= streamed
        shares.append(f"{percent}%: {len(streamed)}/{len(users)} users streamed")
    print("rollout walk:", "; ".join(shares))
    failed = [s for s in load.sent if not s.ok and s.path not in ("rejected", "lost")]
    assert not failed, failed


async def _wait_stage(url: str, stage: int, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    view: Any = None
    while time.monotonic() < deadline:
        view = await _admin(url, "GET", "/admin/rollout")
        if view["stage"] >= stage or view["state"] != "running":
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"stage {stage} not reached in {timeout_s}s: {view}")


FAILED_QUERY = 'sum(bridge_requests_total{path=~"stream|fallback",ok="false"})'


def _prom(prometheus: LocalPrometheus, query: str) -> float:
    reply = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": query}, timeout=5)
    result = reply.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


async def test_too_few_samples_wait_promote_409_unless_forced(stack: Stack, clean: Redis) -> None:
    start = {"plan": [10, 100], "dwellS": 0, "minSamples": 100_000, "auto": True}
    await _admin(stack.urls[0], "POST", "/admin/rollout/start", start)
    async with Load(stack.urls, pick_users()[:4]).running():
        await asyncio.sleep(3)
        view = await _admin(stack.urls[1], "GET", "/admin/rollout")
    gates = {g["name"]: g for g in view["gates"]}
    assert view["state"] == "running" and view["stage"] == 0  # auto promoted nothing
    assert gates["dwell"]["verdict"] == "pass"
    assert gates["p95_ttft"]["verdict"] == "wait" and 0 < gates["p95_ttft"]["samples"] < 100_000
    assert gates["p95_ttft"]["value"] is not None  # data there, too little of it
    refused = await _admin(stack.urls[1], "POST", "/admin/rollout/promote", {}, status=409)
    assert refused["code"] == "FORBIDDEN" and "p95_ttft wait" in refused["message"]
    view = await _admin(
        stack.urls[1], "POST", "/admin/rollout/promote", {"force": True, "reason": "drill"}
    )
    assert view["state"] == "done"
    entry = (await _admin(stack.urls[0], "GET", "/admin/audit?limit=1"))[0]
    assert (entry["action"], entry["forced"], entry["actor"]) == ("promote", True, "ops-carol")


async def test_kill_switch_through_the_api_is_obeyed_by_both_replicas_within_1s(
    stack: Stack, clean: Redis
) -> None:
    await _admin(stack.urls[0], "PATCH", "/admin/flags", {"percent": 100, "enabled": True})
    await asyncio.sleep(1.5)
    user = pick_users()[0]
    clients = []
    async with contextlib.AsyncExitStack() as exits:
        for url in stack.urls:
            client = await exits.enter_async_context(connected(url, user))
            room = new_id("ks-room")
            assert (await client.call("join_room", {"roomId": room}))["ok"]
            clients.append((client, room))
            ack = await client.call("send_message", {"roomId": room, "content": HEALTHY})
            assert ack["path"] == "stream"
        killed_at = time.monotonic()
        await _admin(stack.urls[0], "PATCH", "/admin/flags", {"enabled": False, "reason": "kill"})
        obeyed: dict[int, float] = {}
        while len(obeyed) < 2 and time.monotonic() - killed_at < 5:
            for i, (client, _room) in enumerate(clients):
                if i in obeyed:
                    continue
                # a room of its own per send: the room's queue never refuses it (ROOM_BUSY)
                fresh = {"roomId": new_id("ks-room"), "content": HEALTHY}
                ack = await client.call("send_message", fresh)
                assert ack["ok"] is True, ack
                if ack["path"] == "complete":
                    obeyed[i] = time.monotonic() - killed_at
            await asyncio.sleep(0.02)
    print("kill switch obeyed after " + ", ".join(
        f"replica {i + 1}: {obeyed[i] * 1000:.0f} ms" for i in sorted(obeyed)))  # fmt: skip
    assert sorted(obeyed) == [0, 1] and max(obeyed.values()) <= 1.0, obeyed
    entry = (await _admin(stack.urls[1], "GET", "/admin/audit?limit=1"))[0]
    assert (entry["actor"], entry["after"], entry["reason"]) == (
        "ops-carol", {"enabled": False}, "kill"
    )  # fmt: skip


# Last: its failures leave the replicas' breakers open for a while (a rollback signal too).
async def test_failures_on_the_stream_path_roll_back_at_once_naming_the_gate(
    stack: Stack, clean: Redis
) -> None:
    users = pick_users()
    load = Load(stack.urls, users, content=HEALTHY)
    async with load.running():
        start = {"plan": [10, 50, 100], "dwellS": 600, "minSamples": MIN_SAMPLES * 10,
                 "auto": True}  # fmt: skip
        await _admin(stack.urls[0], "POST", "/admin/rollout/start", start)
        await asyncio.sleep(2)
        baseline = _prom(stack.prometheus, FAILED_QUERY)
        load.content = FAILING
        failing_since = time.time()
        # when the evidence reached Prometheus: after the last look that did not see it (the
        # controller may act on it before this loop looks again)
        not_yet = failing_since
        view = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _prom(stack.prometheus, FAILED_QUERY) <= baseline:
                not_yet = time.time()
            view = await _admin(stack.urls[1], "GET", "/admin/rollout")
            if view["state"] != "running":
                break
            await asyncio.sleep(0.05)
    assert view is not None and view["state"] == "rolled_back", view
    assert view["percent"] == 0
    (entry,) = [e for e in await _admin(stack.urls[0], "GET", "/admin/audit") if
                e["action"] == "rollback"]  # fmt: skip
    assert entry["actor"].startswith("controller:")
    assert entry["gate"] == "failed_sends", entry
    assert "failed_sends" in entry["reason"]
    rolled_at = view["history"][-1]["at_s"]
    print(
        f"rollback: {rolled_at - failing_since:.2f}s after the first failing send, at most "
        f"{rolled_at - not_yet:.2f}s after Prometheus had the first failure "
        f"(evaluation period {EVAL_S}s, scrape 1s)"
    )
    assert rolled_at - not_yet <= EVAL_S + 1.0
    flags = await _admin(stack.urls[1], "GET", "/admin/flags")
    assert flags["percent"] == 0
