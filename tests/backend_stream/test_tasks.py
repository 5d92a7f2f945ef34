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
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from contracts import TaskOutcome, TaskState
from contracts.redis_server import EmbeddedRedis
from tests.backend_stream.conftest import (
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
