"""Batch tasks (CONTRACT.md section 2 "Batch"): ``POST /chat/tasks``, ``GET /chat/tasks/{id}``,
the queue's workers, the outcome on ``bs:tasks:done``; real Redis, real backend processes.

The module has a Redis of its own, so no other suite's backend works from its queue: ``worker``
runs the jobs (two at a time), ``front`` (``TASK_WORKERS=0``) only accepts and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import pytest
from redis.asyncio import Redis

from backend_stream.app import Services, build_services
from backend_stream.metrics import Metrics
from backend_stream.settings import Settings
from backend_stream.store import GenKey
from backend_stream.tasks import TaskQueue, task_key
from backend_stream.tracing import Tracing
from backend_stream.usage import reservation_key
from contracts import ChatRequest, ErrorCode, TaskOutcome, TaskState
from contracts.redis_server import EmbeddedRedis
from tests.backend_stream.conftest import (
    FAST_ENV,
    MAX_CONTENT_CHARS,
    Backend,
    body,
    parse_frames,
    start_backend,
)
from tests.backend_stream.test_registry import history

DONE_CHANNEL = "bs:tasks:done"
WORKER_ENV = {
    "TASK_WORKERS": "2",
    "TASK_MAX_ATTEMPTS": "3",
    "TASK_TIMEOUT_S": "4",
    "TASK_CLAIM_IDLE_S": "2",
    "MAX_OUTPUT_TOKENS": "8",
    "BATCH_MAX_TOKENS": "16",
}


@pytest.fixture(scope="module")
def task_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def worker(task_redis: EmbeddedRedis) -> Iterator[Backend]:
    proc = start_backend(task_redis.url, **WORKER_ENV)
    yield Backend(proc)
    proc.stop()


@pytest.fixture(scope="module")
def front(task_redis: EmbeddedRedis, worker: Backend) -> Iterator[Backend]:
    proc = start_backend(task_redis.url, **{**WORKER_ENV, "TASK_WORKERS": "0"})
    yield Backend(proc)
    proc.stop()


@pytest.fixture
async def redis(task_redis: EmbeddedRedis) -> AsyncIterator[Redis]:
    client = Redis.from_url(task_redis.url, decode_responses=True)
    yield client
    await client.aclose()


class Outcomes:
    """Every TaskOutcome published on ``bs:tasks:done`` while the test runs."""

    def __init__(self) -> None:
        self.seen: list[TaskOutcome] = []

    def of(self, task_id: str) -> list[TaskOutcome]:
        return [o for o in self.seen if o.task_id == task_id]


@pytest.fixture
async def outcomes(redis: Redis) -> AsyncIterator[Outcomes]:
    found = Outcomes()
    pubsub = redis.pubsub()
    await pubsub.subscribe(DONE_CHANNEL)

    async def listen() -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                found.seen.append(TaskOutcome.model_validate_json(msg["data"]))

    task = asyncio.create_task(listen())
    yield found
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await pubsub.aclose()


async def post_task(client: httpx.AsyncClient, payload: dict[str, str]) -> dict[str, Any]:
    resp = await client.post("/chat/tasks", json=payload)
    assert resp.status_code == 202, resp.text
    data: dict[str, Any] = resp.json()
    return data


async def status(client: httpx.AsyncClient, payload: dict[str, str]) -> dict[str, Any]:
    resp = await client.get(
        f"/chat/tasks/{payload['requestId']}", params={"userId": payload["userId"]}
    )
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


async def wait_end(
    client: httpx.AsyncClient, payload: dict[str, str], timeout_s: float = 20.0
) -> tuple[dict[str, Any], list[str]]:
    """Poll the task until it ended: (its last status, every state seen in order, no repeats)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = await status(client, payload)
        if not seen or seen[-1] != current["status"]:
            seen.append(current["status"])
        if current["status"] in ("done", "failed"):
            return current, seen
        await asyncio.sleep(0.03)
    raise AssertionError(f"task did not end in {timeout_s}s: {seen}")


async def wait_for_state(client: httpx.AsyncClient, payload: dict[str, str], state: str) -> None:
    for _ in range(500):
        if (await status(client, payload))["status"] == state:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"task never {state}")


async def settle(outcomes: Outcomes, task_id: str, wait_s: float = 0.5) -> list[TaskOutcome]:
    """The task's outcomes, after waiting long enough for a second one to show."""
    for _ in range(250):
        if outcomes.of(task_id):
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(wait_s)
    return outcomes.of(task_id)


def of_request(messages: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["requestId"] == request_id]


async def test_the_same_task_posted_again_stores_one_message_and_runs_one_job(
    worker: Backend, front: Backend, outcomes: Outcomes
) -> None:
    payload = body("one job only [[tps=50]] [[tokens=10]]")
    calls = worker.model_calls()
    async with front.client() as client, worker.client() as other:
        replies = await asyncio.gather(
            *(post_task(c, payload) for c in (client, other, client, other))
        )
        user_ids = {r["userMessage"]["id"] for r in replies}
        assert len(user_ids) == 1
        assert all(r["taskId"] == payload["requestId"] for r in replies)
        assert replies[0]["userMessage"]["content"] == payload["content"]
        final, _ = await wait_end(client, payload)
        again = await post_task(client, payload)  # after the end: its state, nothing new
        messages = of_request(await history(client, payload["roomId"]), payload["requestId"])
    assert final["status"] == "done"
    assert again["status"] == "done" and again["userMessage"]["id"] in user_ids
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["id"] in user_ids
    assert messages[1]["id"] == final["messageId"]
    assert messages[1]["content"] == final["content"]
    assert worker.model_calls() - calls == 1
    published = await settle(outcomes, payload["requestId"])
    assert len(published) == 1
    outcome = published[0]
    assert outcome.status is TaskState.DONE and outcome.user_id == payload["userId"]
    assert outcome.room_id == payload["roomId"] and outcome.message_id == final["messageId"]
    assert outcome.message is not None
    assert outcome.message.model_dump(by_alias=True, mode="json") == messages[1]


async def test_status_goes_from_queued_to_running_to_done_with_content_and_usage(
    worker: Backend, front: Backend
) -> None:
    # two long jobs take both of the worker's slots: the third waits in the queue
    blockers = [body(f"blocker {i} [[tps=5]] [[tokens=10]]") for i in range(2)]
    payload = body("then me [[tps=20]] [[tokens=6]]")
    async with front.client() as client:
        for blocker in blockers:
            await post_task(client, blocker)
        for blocker in blockers:  # both running
            await wait_for_state(client, blocker, "running")
        accepted = await post_task(client, payload)
        assert accepted["status"] == "queued"
        queued = await status(client, payload)
        final, seen = await wait_end(client, payload)
        for blocker in blockers:
            await wait_end(client, blocker)
        messages = of_request(await history(client, payload["roomId"]), payload["requestId"])
    assert queued["status"] == "queued" and queued["roomId"] == payload["roomId"]
    assert queued["content"] is None and queued["messageId"] is None
    assert seen == ["queued", "running", "done"]
    assert final["finishReason"] == "stop"
    assert final["usage"]["completionTokens"] == 6
    assert final["usage"]["totalTokens"] == (
        final["usage"]["promptTokens"] + final["usage"]["completionTokens"]
    )
    assert final["content"] and len(final["content"].split()) == 6
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert (messages[1]["id"], messages[1]["content"]) == (final["messageId"], final["content"])


async def test_a_task_is_scoped_to_its_user(front: Backend) -> None:
    payload = body("mine [[tokens=2]]")
    async with front.client() as client:
        await post_task(client, payload)
        other = await client.get(
            f"/chat/tasks/{payload['requestId']}", params={"userId": "someone-else"}
        )
        unknown = await client.get("/chat/tasks/no-such-task", params={"userId": payload["userId"]})
        no_user = await client.get(f"/chat/tasks/{payload['requestId']}")
    async with httpx.AsyncClient(base_url=front.url) as anonymous:
        no_token = await anonymous.get(
            f"/chat/tasks/{payload['requestId']}", params={"userId": payload["userId"]}
        )
    assert (other.status_code, other.json()["code"]) == (404, "NOT_FOUND")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "NOT_FOUND")
    assert (no_user.status_code, no_user.json()["code"]) == (422, "INVALID_PAYLOAD")
    assert (no_token.status_code, no_token.json()["code"]) == (401, "UNAUTHORIZED")


async def test_bad_bodies_are_refused_and_queue_nothing(front: Backend, redis: Redis) -> None:
    length = await redis.xlen("bs:tasks")
    good = body("fine")
    cases: list[tuple[Any, int, str]] = [
        (b"not json", 422, "INVALID_PAYLOAD"),
        (b"[1, 2]", 422, "INVALID_PAYLOAD"),
        ({k: v for k, v in good.items() if k != "content"}, 422, "INVALID_PAYLOAD"),
        ({**good, "requestId": "bad/id"}, 422, "INVALID_PAYLOAD"),
        ({**good, "content": 42}, 422, "INVALID_PAYLOAD"),
        ({**good, "content": "   "}, 400, "EMPTY_MESSAGE"),
        ({**good, "content": "x" * (MAX_CONTENT_CHARS + 1)}, 413, "MESSAGE_TOO_LONG"),
        (b'{"content": "' + b"x" * 200_000 + b'"}', 413, "INVALID_PAYLOAD"),
    ]
    async with front.client() as client:
        for sent, code, name in cases:
            if isinstance(sent, bytes):
                resp = await client.post("/chat/tasks", content=sent)
            else:
                resp = await client.post("/chat/tasks", json=sent)
            assert (resp.status_code, resp.json()["code"]) == (code, name), sent
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        async with httpx.AsyncClient(base_url=front.url, headers=headers) as anonymous:
            refused = await anonymous.post("/chat/tasks", json=good)
        assert (refused.status_code, refused.json()["code"]) == (401, "UNAUTHORIZED")
    assert await redis.xlen("bs:tasks") == length
    assert not await redis.exists(f"bs:task:{good['userId']}/{good['requestId']}")


async def test_a_failing_job_is_retried_a_bounded_number_of_times_then_failed(
    worker: Backend, front: Backend, redis: Redis, outcomes: Outcomes
) -> None:
    payload = body("always fails [[fail=500]]")
    calls = worker.model_calls()
    async with front.client() as client:
        await post_task(client, payload)
        final, _ = await wait_end(client, payload)
        messages = of_request(await history(client, payload["roomId"]), payload["requestId"])
    record = await redis.hgetall(f"bs:task:{payload['userId']}/{payload['requestId']}")
    assert final["status"] == "failed" and final["code"] == "MODEL_ERROR"
    assert final["content"] is None and final["messageId"] is None
    assert record["attempts"] == "3"
    assert worker.model_calls() - calls == 3
    assert [m["role"] for m in messages] == ["user"]  # no assistant message for a failure
    published = await settle(outcomes, payload["requestId"])
    assert [(o.status, o.code, o.message) for o in published] == [
        (TaskState.FAILED, "MODEL_ERROR", None)
    ]
    # the failed task stays readable, and posting it again runs nothing
    async with front.client() as client:
        again = await post_task(client, payload)
    assert again["status"] == "failed"
    await asyncio.sleep(0.3)
    assert worker.model_calls() - calls == 3


async def test_a_job_that_outlives_the_task_timeout_fails_with_model_timeout(
    worker: Backend, front: Backend, redis: Redis
) -> None:
    payload = body("too slow [[tps=2]] [[tokens=40]]")  # 20 s of tokens; TASK_TIMEOUT_S is 4
    started = time.monotonic()
    async with front.client() as client:
        await post_task(client, payload)
        final, _ = await wait_end(client, payload)
        took_s = time.monotonic() - started
        await asyncio.sleep(0.5)  # the stopped generation stores nothing after it either
        messages = of_request(await history(client, payload["roomId"]), payload["requestId"])
    assert final["status"] == "failed" and final["code"] == "MODEL_TIMEOUT"
    assert 3.5 < took_s < 8
    assert [m["role"] for m in messages] == ["user"]
    record = await redis.hgetall(f"bs:task:{payload['userId']}/{payload['requestId']}")
    assert record["attempts"] == "1"


async def test_batch_answers_get_the_larger_output_budget(worker: Backend, front: Backend) -> None:
    content = "a long answer please [[tps=0]] [[tokens=30]]"
    task = body(content)
    streamed = body(content)
    async with front.client() as client:
        await post_task(client, task)
        final, _ = await wait_end(client, task)
        resp = await client.post("/chat/messages/stream", json=streamed)
    end = json.loads(parse_frames(resp.content)[-1]["data"])
    assert final["status"] == "done"
    assert (final["usage"]["completionTokens"], final["finishReason"]) == (16, "length")
    assert (end["usage"]["completionTokens"], end["finishReason"]) == (8, "length")


async def test_a_task_and_a_message_request_with_the_same_id_are_one_exchange(
    worker: Backend, front: Backend
) -> None:
    async with front.client() as client:
        # a task first, then the stream endpoint with its id: it joins the task's generation
        task = body("task first [[tps=20]] [[tokens=8]]")
        accepted = await post_task(client, task)
        resp = await client.post("/chat/messages/stream", json=task)
        frames = parse_frames(resp.content)
        final, _ = await wait_end(client, task)
        # a stream request first, then a task with its id: the task follows that generation
        streamed = body("stream first [[tokens=5]]")
        resp2 = await client.post("/chat/messages/stream", json=streamed)
        start2 = json.loads(parse_frames(resp2.content)[0]["data"])
        adopted = await post_task(client, streamed)
        final2, _ = await wait_end(client, streamed)
        first = of_request(await history(client, task["roomId"]), task["requestId"])
        second = of_request(await history(client, streamed["roomId"]), streamed["requestId"])
    start = json.loads(frames[0]["data"])
    assert start["userMessageId"] == accepted["userMessage"]["id"]
    assert start["messageId"] == final["messageId"]
    assert frames[-1]["event"] == "end"
    assert json.loads(frames[-1]["data"])["content"] == final["content"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert adopted["userMessage"]["id"] == start2["userMessageId"]
    assert final2["status"] == "done" and final2["messageId"] == start2["messageId"]
    assert [m["role"] for m in second] == ["user", "assistant"]


async def test_a_long_job_keeps_its_queue_entry_so_nobody_takes_it_over(
    worker: Backend, front: Backend, redis: Redis
) -> None:
    payload = body("long but alive [[tps=5]] [[tokens=16]]")  # ~3 s; TASK_CLAIM_IDLE_S is 2
    calls = worker.model_calls()
    async with front.client() as client:
        await post_task(client, payload)
        await wait_for_state(client, payload, "running")
        await asyncio.sleep(2.6)  # past the claim idle time: a stale entry would be taken
        pending = await redis.xpending_range("bs:tasks", "workers", "-", "+", 10)
        final, _ = await wait_end(client, payload)
    assert len(pending) == 1, pending
    assert pending[0]["times_delivered"] == 1
    assert pending[0]["time_since_delivered"] < 2000
    assert final["status"] == "done" and final["usage"]["completionTokens"] == 16
    assert worker.model_calls() - calls == 1
    record = await redis.hgetall(f"bs:task:{payload['userId']}/{payload['requestId']}")
    assert record["attempts"] == "1"


async def test_the_queue_is_full_by_what_waits_not_by_what_was_acknowledged(
    task_redis: EmbeddedRedis, worker: Backend, redis: Redis
) -> None:
    # TASK_QUEUE_MAX=3: XLEN keeps acknowledged entries (MINID ~ trims whole nodes only), so
    # three finished tasks must not fill it; two running and one queued do
    small = Backend(start_backend(task_redis.url, **{**WORKER_ENV, "TASK_WORKERS": "0",
                                                     "TASK_QUEUE_MAX": "3"}))  # fmt: skip
    try:
        async with small.client() as client:
            quick = [body(f"quick {i} [[tokens=2]]") for i in range(3)]
            for payload in quick:
                await post_task(client, payload)
            for payload in quick:
                assert (await wait_end(client, payload))[0]["status"] == "done"
            assert await redis.xlen("bs:tasks") >= 3  # acknowledged, still in the stream
            after = body("nothing waits [[tokens=2]]")
            await post_task(client, after)  # accepted: nothing waits
            await wait_end(client, after)
            # the worker's two slots taken (pending), one more queued (lag): three wait
            blockers = [body(f"blocker {i} [[tps=5]] [[tokens=10]]") for i in range(2)]
            for blocker in blockers:
                await post_task(client, blocker)
            for blocker in blockers:
                await wait_for_state(client, blocker, "running")
            await post_task(client, body("queued behind them [[tokens=2]]"))
            refused = body("one too many")
            resp = await client.post("/chat/tasks", json=refused)
            for blocker in blockers:
                await wait_end(client, blocker)
    finally:
        small.proc.stop()
    assert (resp.status_code, resp.json()["code"]) == (503, "BACKEND_UNAVAILABLE"), resp.text
    assert resp.headers.get("retry-after")
    assert not await redis.exists(f"bs:task:{refused['userId']}/{refused['requestId']}")


async def test_a_task_with_a_message_requests_id_in_another_room_is_refused(
    front: Backend, redis: Redis
) -> None:
    payload = body("first a streamed answer [[tokens=3]]")
    async with front.client() as client:
        resp = await client.post("/chat/messages/stream", json=payload)
        assert resp.status_code == 200
        length = await redis.xlen("bs:tasks")
        elsewhere = {**payload, "roomId": f"{payload['roomId']}-other"}
        refused = await client.post("/chat/tasks", json=elsewhere)
        other_room = await history(client, elsewhere["roomId"])
        same_room = of_request(await history(client, payload["roomId"]), payload["requestId"])
    assert (refused.status_code, refused.json()["code"]) == (422, "INVALID_PAYLOAD"), refused.text
    assert other_room == []
    assert [m["role"] for m in same_room] == ["user", "assistant"]  # untouched
    assert not await redis.exists(f"bs:task:{payload['userId']}/{payload['requestId']}")
    assert await redis.xlen("bs:tasks") == length
    # the reservation the refused task made is released (the stream request's was settled)
    assert not await redis.exists(reservation_key(payload["userId"], payload["requestId"]))


# ---- interleavings of two workers ----------------------------------------------------------
# Two workers' steps in a given order cannot be timed between processes: these run the queue in
# the test's process (real Redis of their own, the real scripts, registry and scripted model,
# no worker loop) and put the other worker's step exactly between two of this one's.


@dataclass
class Local:
    services: Services
    queue: TaskQueue  # worker B, the one under test
    other: TaskQueue  # worker A, on the same Redis

    @property
    def redis(self) -> Redis:
        return self.services.redis

    def model_calls(self) -> float:
        found = self.services.metrics.registry.get_sample_value(
            "backend_model_calls_total", {"provider": "scripted"}
        )
        return found or 0.0


@pytest.fixture
async def local() -> AsyncIterator[Local]:
    with EmbeddedRedis() as server:
        env = {**FAST_ENV, "REDIS_URL": server.url, **WORKER_ENV, "TASK_WORKERS": "0"}
        settings = Settings.from_env(env)
        metrics = Metrics()
        services = build_services(
            settings, metrics, Tracing.create(enabled=False, service_name="t")
        )
        services.writer.start()
        services.runner.start()
        services.registry.start()
        queues = [
            TaskQueue(
                redis=services.redis,
                store=services.store,
                registry=services.registry,
                feed=services.feed,
                settings=settings,
                metrics=metrics,
                ledger=services.ledger,
            )  # fmt: skip
            for _ in range(2)
        ]
        try:
            yield Local(services, *queues)
        finally:
            for queue in queues:
                await queue.aclose()
            await services.registry.aclose()
            await services.runner.aclose()
            await services.writer.aclose()
            await services.provider.aclose()
            await services.redis.aclose()


def task_request(content: str) -> ChatRequest:
    ids = body(content)
    return ChatRequest(
        request_id=ids["requestId"], room_id=ids["roomId"], user_id=ids["userId"], content=content
    )


def after_first_read(
    monkeypatch: pytest.MonkeyPatch, redis: Redis, key: str, step: Callable[[], Awaitable[Any]]
) -> None:
    """Run ``step`` (the other worker) right after this process's first HGETALL of ``key``."""
    original = redis.hgetall
    fired = False

    async def hgetall(name: str) -> Any:
        nonlocal fired
        value = await cast(Awaitable[Any], original(name))
        if name == key and not fired:
            fired = True
            await step()
        return value

    monkeypatch.setattr(redis, "hgetall", hgetall)


async def take_entry(queue: TaskQueue) -> tuple[str, str, bool]:
    for _ in range(10):
        entry = await queue._next_entry()
        if entry is not None:
            return entry
    raise AssertionError("no queue entry")


async def test_a_worker_never_turns_an_ended_task_back_to_running(
    local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    # B took the job over from A (stalled, alive) and read the task while it was running; A's
    # end lands before B starts: B must leave it ended (before: `running` for TASK_TTL_S)
    req = task_request("taken over [[tokens=3]]")
    key = GenKey(req.user_id, req.request_id)
    await local.queue.accept(req)
    entry_id, slug, _ = await take_entry(local.queue)
    await local.redis.hset(task_key(key), "state", "running")
    record = await cast(Awaitable[dict[str, str]], local.redis.hgetall(task_key(key)))

    async def a_ends() -> None:
        await local.other._fail(entry_id, key, record, ErrorCode.MODEL_ERROR, "A's end")

    after_first_read(monkeypatch, local.redis, task_key(key), a_ends)
    await local.queue._process(entry_id, slug, True)
    await asyncio.sleep(0.3)  # a generation B started would be running by now
    status = await local.queue.status(req.user_id, req.request_id)
    assert status is not None
    assert (status.status, status.code) == (TaskState.FAILED, ErrorCode.MODEL_ERROR)
    assert local.model_calls() == 0
    pending = await local.redis.xpending("bs:tasks", "workers")
    assert pending["pending"] == 0


async def test_attempts_taken_by_another_worker_count_against_the_cap(
    local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TASK_MAX_ATTEMPTS=3. B reads attempts=2, then A starts the third: B must not start a
    # fourth (before: B's own stale count let it)
    req = task_request("the last attempt [[tokens=3]]")
    key = GenKey(req.user_id, req.request_id)
    await local.queue.accept(req)
    entry_id, slug, _ = await take_entry(local.queue)
    await local.redis.hset(task_key(key), mapping={"attempts": 2, "lastCode": "MODEL_ERROR"})

    async def a_takes_the_third() -> None:
        await local.redis.hincrby(task_key(key), "attempts", 1)

    after_first_read(monkeypatch, local.redis, task_key(key), a_takes_the_third)
    await local.queue._process(entry_id, slug, True)
    record = await cast(Awaitable[dict[str, str]], local.redis.hgetall(task_key(key)))
    assert record["attempts"] == "3"
    assert (record["state"], record["code"]) == ("failed", "MODEL_ERROR")
    assert local.model_calls() == 0


@pytest.mark.parametrize("ended", [False, True])
async def test_a_reservation_is_released_only_when_no_generation_will_settle_it(
    local: Local, monkeypatch: pytest.MonkeyPatch, ended: bool
) -> None:
    # Two posts of one task at once: the first reserves, then the second is accepted whole
    # (its admit finds the reservation), then the first's script finds the task ('existing').
    # Queued: its job's generation will settle that reservation, it stays. Ended (no
    # generation will run): the first call's reservation is released.
    req = task_request("posted twice [[tokens=3]]")
    key = GenKey(req.user_id, req.request_id)
    ledger = local.services.ledger
    assert ledger is not None
    reserve = ledger.reserve
    made: list[bool] = []

    async def reserve_then_the_other_post(user_id: str, request_id: str, tokens: int) -> bool:
        mine = await reserve(user_id, request_id, tokens)
        made.append(mine)
        if len(made) == 1:
            assert (await local.other.accept(req)).status is TaskState.QUEUED
            if ended:
                record = await cast(Awaitable[dict[str, str]], local.redis.hgetall(task_key(key)))
                await local.other._fail("", key, record, ErrorCode.MODEL_TIMEOUT, "ended")
        return mine

    await local.other._ensure_group()  # as a worker that ends a task has
    monkeypatch.setattr(ledger, "reserve", reserve_then_the_other_post)
    accepted = await local.queue.accept(req)
    assert made == [True, False]
    assert accepted.status is (TaskState.FAILED if ended else TaskState.QUEUED)
    kept = await local.redis.exists(reservation_key(req.user_id, req.request_id))
    assert kept == (0 if ended else 1)
