"""Batch mode end to end (issue 12): the real backend (its job queue, its record and its one
``bs:tasks:done`` publication per task) and two bridge processes on one Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.bridge.harness import Client, connected, new_id, token
from tests.integration.conftest import BACKEND_TOKEN
from tests.support.procs import ServerProcess
from tests.support.tasks import roles, task_of

# ~2 s of generation at 20 tokens/s: long enough to disconnect, peek and leave while it runs
SLOW = "[[tps=20]] [[tokens=40]] a detailed answer, please"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def until(predicate: Any, wait_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + wait_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met in {wait_s}s"
        await asyncio.sleep(0.02)


def get_task(url: str, task_id: str, bearer: str | None) -> httpx.Response:
    headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
    return httpx.get(f"{url}/tasks/{task_id}", headers=headers, timeout=10)


async def wait_finished(url: str, task_id: str, bearer: str, wait_s: float = 30.0) -> Any:
    deadline = time.monotonic() + wait_s
    while True:
        reply = get_task(url, task_id, bearer)
        assert reply.status_code == 200, reply.text
        if reply.json()["status"] in ("done", "failed"):
            return reply.json()
        assert time.monotonic() < deadline, f"task {task_id} still {reply.json()['status']}"
        await asyncio.sleep(0.1)


async def wait_recorded(redis: Redis, user_id: str, task_id: str, wait_s: float = 5.0) -> None:
    """Until a bridge replica recorded the published outcome as undelivered for the user."""
    deadline = time.monotonic() + wait_s
    while not await redis.hexists(f"bridge:tasks:{user_id}:outcomes", task_id):
        assert time.monotonic() < deadline, "no bridge recorded the outcome"
        await asyncio.sleep(0.02)


def history(url: str, room: str, user_id: str) -> list[Any]:
    headers = {"Authorization": f"Bearer {token(user_id)}"}
    reply = httpx.get(f"{url}/rooms/{room}/messages", headers=headers, timeout=10)
    assert reply.status_code == 200, reply.text
    messages: list[Any] = reply.json()["messages"]
    return messages


def backend_task(backend_url: str, task_id: str, user_id: str) -> httpx.Response:
    """The backend's own view (service token): ``GET /chat/tasks/{id}?userId=U``."""
    return httpx.get(
        f"{backend_url}/chat/tasks/{task_id}", params={"userId": user_id},
        headers={"Authorization": f"Bearer {BACKEND_TOKEN}"}, timeout=10,
    )  # fmt: skip


def batch_requests(urls: tuple[str, ...]) -> float:
    """``bridge_requests_total{path="batch",ok="true"}`` summed over the replicas: one per
    outcome delivered, counted by the one replica that delivered it."""
    total = 0.0
    for url in urls:
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            if line.startswith('bridge_requests_total{ok="true",path="batch"}'):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def send_batch(client: Client, room: str, content: str = SLOW) -> dict[str, Any]:
    rid = new_id("task")
    started = time.monotonic()
    ack: dict[str, Any] = await client.call(
        "send_message", {"roomId": room, "content": content, "requestId": rid, "mode": "batch"}
    )
    assert time.monotonic() - started < 1.0, "a batch ack is immediate"
    assert ack == {
        "ok": True, "stage": "accepted", "requestId": rid, "roomId": room, "messageId": None,
        "path": "batch", "taskId": rid,
    }  # fmt: skip
    return ack


async def test_an_offline_sender_gets_pending_tasks_then_the_outcome_once(
    replicas: tuple[str, str], redis: Redis
) -> None:
    one, two = replicas
    alice_id, room = new_id("alice"), new_id("room")
    before = batch_requests(replicas)
    async with connected(one, alice_id) as alice:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        rid = (await send_batch(alice, room))["requestId"]
        await until(lambda: roles(alice, rid) == ["user"], 3, "the user's new_message at once")
        (user_message,) = task_of(alice, "new_message", rid)
        assert user_message["message"]["content"] == SLOW
        assert user_message["message"]["userId"] == alice_id
    # the sender is gone; back for a moment (the other replica) while it still runs
    async with connected(two, alice_id) as peek:
        joined = await peek.call("join_room", {"roomId": room})
        assert joined["ok"] is True and joined["pendingTasks"] == [rid]
    status = await wait_finished(one, rid, token(alice_id))
    assert status["status"] == "done" and status["roomId"] == room
    assert status["content"] and status["messageId"]
    # only the sender may read it
    assert get_task(two, rid, token(new_id("eve"))).status_code == 404
    assert get_task(two, rid, None).status_code == 401
    assert get_task(two, "not a task id", token(alice_id)).status_code == 422
    await wait_recorded(redis, alice_id, rid)
    async with connected(two, alice_id) as back, connected(one, alice_id) as tab:
        joined = await back.call("join_room", {"roomId": room})
        assert joined["ok"] is True and joined["pendingTasks"] == []
        await until(lambda: len(task_of(back, "task_done", rid)) == 1, 5, "task_done")
        assert task_of(back, "task_done", rid) == [
            {"taskId": rid, "roomId": room, "messageId": status["messageId"], "ok": True}
        ]
        (reply,) = task_of(back, "new_message", rid)  # it missed the room's live one
        assert reply["message"]["role"] == "assistant"
        assert reply["message"]["content"] == status["content"]
        assert [n for n, _ in back.events if n in ("new_message", "task_done")] == [
            "new_message", "task_done",
        ]  # fmt: skip
        # a second join, a second socket: not again
        assert (await back.call("join_room", {"roomId": room}))["pendingTasks"] == []
        assert (await tab.call("join_room", {"roomId": room}))["pendingTasks"] == []
        await asyncio.sleep(0.7)
        assert len(task_of(back, "task_done", rid)) == 1
        assert task_of(tab, "task_done", rid) == [] and task_of(tab, "new_message", rid) == []
    messages = history(one, room, alice_id)
    assert [(m["role"], m["requestId"]) for m in messages] == [("user", rid), ("assistant", rid)]
    assert messages[1]["content"] == status["content"]
    assert messages[1]["id"] == status["messageId"]
    assert batch_requests(replicas) - before == 1


async def test_an_online_sender_and_a_member_on_two_replicas_get_it_once(
    replicas: tuple[str, str], redis: Redis
) -> None:
    one, two = replicas
    alice_id, bob_id, room = new_id("alice"), new_id("bob"), new_id("room")
    before = batch_requests(replicas)
    async with (
        connected(one, alice_id) as a1,
        connected(two, alice_id) as a2,
        connected(two, bob_id) as bob,
    ):
        assert (await a1.call("join_room", {"roomId": room}))["ok"] is True
        assert (await a1.call("add_member", {"roomId": room, "userId": bob_id}))["ok"] is True
        for client in (a2, bob):
            assert (await client.call("join_room", {"roomId": room}))["ok"] is True
        tasks = [(await send_batch(a1, room))["requestId"]]
        tasks.append((await send_batch(a2, room, "[[tokens=5]] and a short one"))["requestId"])
        for rid in tasks:
            for client in (a1, a2, bob):
                await until(lambda c=client, r=rid: roles(c, r) == ["user"], 3, "user message")
        for rid in tasks:
            for client in (a1, a2):
                await until(lambda c=client, r=rid: len(task_of(c, "task_done", r)) == 1)
            await until(lambda r=rid: roles(bob, r) == ["user", "assistant"])
        await asyncio.sleep(1.0)
        for rid in tasks:
            status = get_task(one, rid, token(alice_id)).json()
            for client in (a1, a2, bob):
                assert roles(client, rid) == ["user", "assistant"], client.names()
                reply = task_of(client, "new_message", rid)[1]["message"]
                assert reply["role"] == "assistant" and reply["content"] == status["content"]
            for client in (a1, a2):
                assert task_of(client, "task_done", rid) == [
                    {"taskId": rid, "roomId": room, "messageId": status["messageId"], "ok": True}
                ]
            assert task_of(bob, "task_done", rid) == []
        # delivered live (and confirmed): nothing stays for a later join or socket
        deadline = time.monotonic() + 10
        while await redis.hlen(f"bridge:tasks:{alice_id}:outcomes"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with connected(one, alice_id) as later:
            assert (await later.call("join_room", {"roomId": room}))["pendingTasks"] == []
            await asyncio.sleep(0.5)
            assert "task_done" not in later.names()
        assert all(len(task_of(a1, "task_done", rid)) == 1 for rid in tasks)
    assert batch_requests(replicas) - before == len(tasks)


async def test_an_unknown_mode_is_invalid_and_never_reaches_the_backend(
    replicas: tuple[str, str], backend: ServerProcess
) -> None:
    one, _ = replicas
    alice_id, room, rid = new_id("alice"), new_id("room"), new_id("task")
    async with connected(one, alice_id) as alice:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        ack = await alice.call(
            "send_message", {"roomId": room, "content": "hi", "requestId": rid, "mode": "later"}
        )
        assert ack["ok"] is False and ack["code"] == "INVALID_PAYLOAD" and "mode" in ack["message"]
        await asyncio.sleep(0.3)
        assert "new_message" not in alice.names()
    assert get_task(one, rid, token(alice_id)).status_code == 404
    assert backend_task(backend.url, rid, alice_id).status_code == 404
    assert history(one, room, alice_id) == []
