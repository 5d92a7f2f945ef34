"""Batch tasks across two backend replicas on one Redis (issue 12 "What it must show"): the
queue spreads jobs over both and runs each once; a replica killed mid-job (SIGKILL) or stopped
(SIGTERM) loses nothing; the webhook is delivered once, signed, with back-off.

Real processes, a real Redis of this module's own (no other suite's backend works from its
queue), and a real HTTP receiver for the webhook (aiohttp on loopback) that checks the
``X-Signature-Timestamp`` and ``X-Signature-SHA256`` headers of every delivery (HMAC over
``"{timestamp}." + body``; a timestamp more than ``MAX_SKEW_S`` away is refused: no replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
import pytest
from aiohttp import web
from redis.asyncio import Redis

from contracts import TaskOutcome, TaskState
from contracts.redis_server import EmbeddedRedis, free_port
from tests.backend_stream.conftest import metric
from tests.support.backend import fast_backend_env
from tests.support.procs import ServerProcess

pytestmark = pytest.mark.slow

TOKEN = "tasks-integration-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "webhook-secret-for-the-tests-0123456789"
DONE_CHANNEL = "bs:tasks:done"
MAX_SKEW_S = 300  # the receiver's tolerance for the signed timestamp (README: a few minutes)


@pytest.fixture(scope="module")
def task_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def hook_port() -> int:
    return free_port()


def replica_env(redis_url: str, hook_port: int, **extra: str) -> dict[str, str]:
    return {
        **fast_backend_env(redis_url, TOKEN),
        "TASK_WORKERS": "4",
        "TASK_CLAIM_IDLE_S": "2",
        # a killed replica's generation lease and room lock lapse before its job is taken over
        "GENERATION_LEASE_S": "1",
        "ROOM_LOCK_TTL_S": "1",
        "TASK_WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/hook",
        "TASK_WEBHOOK_SECRET": SECRET,
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def start_replicas(env: dict[str, str]) -> list[ServerProcess]:
    procs = [ServerProcess.python_module("backend_stream", env=env) for _ in range(2)]
    for proc in procs:
        proc.start()
    return procs


@pytest.fixture
def replicas(task_redis: EmbeddedRedis, hook_port: int) -> Iterator[list[ServerProcess]]:
    procs = start_replicas(replica_env(task_redis.url, hook_port))
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture
async def redis(task_redis: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(task_redis.url, decode_responses=True)
    yield client
    await client.aclose()


class Receiver:
    """The webhook's receiver: refuses a bad or stale signature (401), the first ``fail_first``
    deliveries of each task (503), answers the first ``slow_first`` of the others slowly (a
    200 trickled over ``slow_s``, a byte every 0.1 s: no read ever waits long), and accepts
    the rest. A delivery counts as accepted once its whole answer went out."""

    def __init__(self, fail_first: int = 0, slow_first: int = 0, slow_s: float = 0.0) -> None:
        self.fail_first = fail_first
        self.slow_first = slow_first
        self.slow_s = slow_s
        self.calls: list[tuple[str, float, bool, int]] = []  # taskId, at, signed, status
        self.accepted: dict[str, list[TaskOutcome]] = {}
        self.received: list[tuple[dict[str, str], bytes]] = []  # each call's headers and body
        self.took: list[float] = []  # how long each call was open, in order of their ends
        self.open = 0
        self.most_open = 0

    @staticmethod
    def verify(headers: Mapping[str, str], raw: bytes, now: float) -> bool:
        """What a receiver must check (backend_stream/README.md "Batch tasks"); ``headers``
        with lower-case names."""
        stamp = headers.get("x-signature-timestamp", "")
        if not stamp.isdigit() or abs(now - int(stamp)) > MAX_SKEW_S:
            return False
        signed = f"{stamp}.".encode() + raw
        expected = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
        return hmac.compare_digest(headers.get("x-signature-sha256", ""), expected)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            raw = await request.read()
            headers = {name.lower(): value for name, value in request.headers.items()}
            self.received.append((headers, raw))
            signed = self.verify(headers, raw, time.time())
            outcome = TaskOutcome.model_validate_json(raw)
            before = sum(1 for c in self.calls if c[0] == outcome.task_id)
            status = 401 if not signed else 503 if before < self.fail_first else 200
            self.calls.append((outcome.task_id, time.monotonic(), signed, status))
            slow = status == 200 and before - self.fail_first < self.slow_first
            if not slow:
                if status == 200:
                    self.accepted.setdefault(outcome.task_id, []).append(outcome)
                return web.Response(status=status)
            resp = web.StreamResponse(status=200)
            await resp.prepare(request)
            if await self._trickle(request, resp):
                self.accepted.setdefault(outcome.task_id, []).append(outcome)
            return resp
        finally:
            self.open -= 1
            self.took.append(time.monotonic() - started)

    async def _trickle(self, request: web.Request, resp: web.StreamResponse) -> bool:
        """Whether the whole slow answer went out (False: the sender hung up first)."""
        deadline = time.monotonic() + self.slow_s
        try:
            while time.monotonic() < deadline:
                if request.transport is None or request.transport.is_closing():
                    return False
                await resp.write(b" ")
                await asyncio.sleep(0.1)
            await resp.write_eof()
        except ConnectionError:
            return False
        return True

    def calls_for(self, task_id: str) -> list[tuple[str, float, bool, int]]:
        return [c for c in self.calls if c[0] == task_id]


@contextlib.asynccontextmanager
async def receiver(
    port: int, fail_first: int = 0, slow_first: int = 0, slow_s: float = 0.0
) -> AsyncIterator[Receiver]:
    found = Receiver(fail_first, slow_first, slow_s)
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield found
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def published(redis: Redis) -> AsyncIterator[list[TaskOutcome]]:
    """Every TaskOutcome on ``bs:tasks:done`` while inside."""
    seen: list[TaskOutcome] = []
    pubsub = redis.pubsub()
    await pubsub.subscribe(DONE_CHANNEL)

    async def listen() -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                seen.append(TaskOutcome.model_validate_json(msg["data"]))

    task = asyncio.create_task(listen())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pubsub.aclose()


def task_body(room_id: str, content: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {"requestId": f"t-{tag}", "roomId": room_id, "userId": f"u-{tag}", "content": content}


async def post(client: httpx.AsyncClient, payload: dict[str, str]) -> None:
    resp = await client.post("/chat/tasks", json=payload)
    assert resp.status_code == 202, resp.text


async def status_of(client: httpx.AsyncClient, payload: dict[str, str]) -> dict[str, Any]:
    resp = await client.get(
        f"/chat/tasks/{payload['requestId']}", params={"userId": payload["userId"]}
    )
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


async def wait_state(
    client: httpx.AsyncClient, payload: dict[str, str], states: set[str], timeout_s: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = await status_of(client, payload)
        if current["status"] in states:
            return current
        await asyncio.sleep(0.05)
    raise AssertionError(f"task not {states} in {timeout_s}s: {current}")


async def history(client: httpx.AsyncClient, room_id: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/chat/rooms/{room_id}/messages", params={"limit": 200})
    messages: list[dict[str, Any]] = resp.json()["messages"]
    return messages


async def until(check: Any, timeout_s: float) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def tasks_done(proc: ServerProcess) -> float:
    return metric(proc.url, r'backend_tasks_total\{outcome="done"\}')


async def test_a_hundred_jobs_on_two_replicas_all_run_once(
    replicas: list[ServerProcess], redis: Redis, hook_port: int
) -> None:
    rooms = [f"room-{uuid.uuid4().hex[:8]}" for _ in range(25)]
    payloads = [task_body(rooms[i % 25], f"job {i} [[tokens=5]]") for i in range(100)]
    async with (
        receiver(hook_port) as hook,
        published(redis) as outcomes,
        httpx.AsyncClient(base_url=replicas[0].url, headers=AUTH, timeout=30) as a,
        httpx.AsyncClient(base_url=replicas[1].url, headers=AUTH, timeout=30) as b,
    ):
        await asyncio.gather(*(post(a if i % 2 else b, p) for i, p in enumerate(payloads)))
        finals = await asyncio.gather(*(wait_state(a, p, {"done", "failed"}) for p in payloads))
        await until(lambda: len(hook.accepted) == 100, 20)
        await asyncio.sleep(1.0)  # a second publication or delivery would show by now
        histories = {room: await history(b, room) for room in rooms}
    assert [f["status"] for f in finals] == ["done"] * 100
    for payload, final in zip(payloads, finals, strict=True):
        mine = [m for m in histories[payload["roomId"]] if m["requestId"] == payload["requestId"]]
        assert [m["role"] for m in mine] == ["user", "assistant"], payload
        assert mine[1]["id"] == final["messageId"] and mine[1]["content"] == final["content"]
    by_task: dict[str, list[TaskOutcome]] = {}
    for outcome in outcomes:
        by_task.setdefault(outcome.task_id, []).append(outcome)
    assert sorted(by_task) == sorted(p["requestId"] for p in payloads)
    assert all(len(v) == 1 and v[0].status is TaskState.DONE for v in by_task.values())
    assert sorted(hook.accepted) == sorted(by_task)
    assert all(len(v) == 1 for v in hook.accepted.values())
    assert all(signed and status == 200 for _, _, signed, status in hook.calls)
    done = [tasks_done(proc) for proc in replicas]
    assert sum(done) == 100 and min(done) > 0, done  # both replicas did work
    assert (await redis.xpending("bs:tasks", "workers"))["pending"] == 0


async def test_a_replica_killed_mid_job_loses_nothing(
    replicas: list[ServerProcess], redis: Redis, hook_port: int
) -> None:
    payload = task_body(f"room-{uuid.uuid4().hex[:8]}", "a long one [[tps=5]] [[tokens=20]]")
    async with (
        receiver(hook_port, fail_first=2) as hook,  # the third delivery is accepted
        published(redis) as outcomes,
        httpx.AsyncClient(base_url=replicas[0].url, headers=AUTH, timeout=30) as client,
    ):
        await post(client, payload)
        await wait_state(client, payload, {"running"})
        await until(lambda: any(generations(p) for p in replicas), 5)
        (running,) = [p for p in replicas if generations(p)]
        (survivor,) = [p for p in replicas if p is not running]
        survivor_client = httpx.AsyncClient(base_url=survivor.url, headers=AUTH, timeout=30)
        await asyncio.sleep(0.5)  # a few tokens in
        running.kill()
        async with survivor_client:
            final = await wait_state(survivor_client, payload, {"done", "failed"})
            await until(lambda: payload["requestId"] in hook.accepted, 20)
            await asyncio.sleep(1.0)
            mine = [
                m
                for m in await history(survivor_client, payload["roomId"])
                if m["requestId"] == payload["requestId"]
            ]
    assert final["status"] == "done", final
    assert final["usage"]["completionTokens"] == 20
    assert [m["role"] for m in mine] == ["user", "assistant"]
    assert mine[1]["id"] == final["messageId"] and mine[1]["content"] == final["content"]
    record = await redis.hgetall(f"bs:task:{payload['userId']}/{payload['requestId']}")
    assert record["attempts"] == "2"  # the dead replica's generation, then the survivor's
    assert [o.status for o in outcomes if o.task_id == payload["requestId"]] == [TaskState.DONE]
    assert tasks_done(survivor) == 1
    calls = hook.calls_for(payload["requestId"])
    assert [(signed, status) for _, _, signed, status in calls] == [
        (True, 503),
        (True, 503),
        (True, 200),
    ]
    gaps = [later[1] - earlier[1] for earlier, later in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.8 and gaps[1] >= 1.6, gaps  # back-off: ~1 s, then ~2 s
    assert len(hook.accepted[payload["requestId"]]) == 1
    delivered = hook.accepted[payload["requestId"]][0]
    assert delivered.message is not None and delivered.message.id == final["messageId"]


def generations(proc: ServerProcess) -> float:
    return metric(proc.url, "backend_active_generations")


async def test_a_replica_stopped_mid_job_hands_it_over_at_once(
    task_redis: EmbeddedRedis, redis: Redis, hook_port: int
) -> None:
    # takeover of an idle entry would take 30 s here: only the hand-over at shutdown is quick
    env = replica_env(task_redis.url, hook_port, TASK_CLAIM_IDLE_S="30")
    procs = start_replicas(env)
    payload = task_body(f"room-{uuid.uuid4().hex[:8]}", "stop me [[tps=10]] [[tokens=30]]")
    try:
        async with (
            receiver(hook_port),
            httpx.AsyncClient(base_url=procs[0].url, headers=AUTH, timeout=30) as client,
        ):
            await post(client, payload)
            await wait_state(client, payload, {"running"})
            await until(lambda: any(generations(p) for p in procs), 5)
            (running,) = [p for p in procs if generations(p)]
            (survivor,) = [p for p in procs if p is not running]
            stopped_at = time.monotonic()
            running.stop()
            async with httpx.AsyncClient(base_url=survivor.url, headers=AUTH, timeout=30) as c:
                final = await wait_state(c, payload, {"done", "failed"}, timeout_s=20)
                took_s = time.monotonic() - stopped_at
                mine = [
                    m
                    for m in await history(c, payload["roomId"])
                    if m["requestId"] == payload["requestId"]
                ]
    finally:
        for proc in procs:
            proc.stop()
    assert final["status"] == "done", final
    assert took_s < 15, took_s  # 3 s of tokens after the hand-over, far from the 30 s idle
    assert [m["role"] for m in mine] == ["user", "assistant"]
    assert mine[1]["content"] == final["content"]


async def test_a_slow_webhook_receiver_is_cut_off_and_never_posted_to_twice_at_once(
    task_redis: EmbeddedRedis, redis: Redis, hook_port: int
) -> None:
    # TASK_WEBHOOK_TIMEOUT_S=0.5, so the delivery lease is 2 x 0.5 + 5 = 6 s. The first answer
    # trickles for 9 s, each byte well inside httpx's per-read timeout: only a bound on the
    # whole attempt cuts it at 0.5 s (then retried after ~1 s); without one, the lease lapses
    # while the first post still waits and a second deliverer posts the same body meanwhile.
    env = replica_env(task_redis.url, hook_port, TASK_WEBHOOK_TIMEOUT_S="0.5")
    payload = task_body(f"room-{uuid.uuid4().hex[:8]}", "a quick one [[tokens=3]]")
    rid = payload["requestId"]
    with ServerProcess.python_module("backend_stream", env=env) as proc:
        async with (
            receiver(hook_port, slow_first=1, slow_s=9.0) as hook,
            httpx.AsyncClient(base_url=proc.url, headers=AUTH, timeout=30) as client,
        ):
            await post(client, payload)
            await until(lambda: rid in hook.accepted and hook.open == 0, 20)
            await asyncio.sleep(0.5)  # nothing more comes
    assert len(hook.accepted[rid]) == 1
    assert hook.most_open == 1, "two deliveries of one body were open at once"
    assert [(signed, status) for _, _, signed, status in hook.calls_for(rid)] == [
        (True, 200), (True, 200),
    ]  # fmt: skip
    assert hook.took[0] < 3.0, hook.took  # the trickled answer was given up at ~0.5 s
    assert [h["x-delivery-attempt"] for h, _ in hook.received] == ["1", "2"]
    # the signature covers the timestamp: the same delivery replayed later is refused
    headers, raw = hook.received[-1]
    now = time.time()
    assert Receiver.verify(headers, raw, now)
    assert not Receiver.verify(headers, raw, now + MAX_SKEW_S + 1)
    moved = {**headers, "x-signature-timestamp": str(int(headers["x-signature-timestamp"]) + 1)}
    assert not Receiver.verify(moved, raw, now)
