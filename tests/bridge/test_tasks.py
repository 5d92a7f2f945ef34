"""Batch mode, the bridge's half (bridge/tasks.py), against real bridges and a real Redis with a
scripted backend: the outcome is published by the test itself on ``bs:tasks:done``, so who
receives what, and how often, is exact (tests/integration/test_batch.py runs the real backend).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import parse_qs

import pytest
from redis.asyncio import Redis

from backend_stream.settings import DEFAULT_TASK_TTL_S
from bridge import tasks as bridge_tasks
from bridge.tasks import CHANNEL, DELIVERED_KEEP_S, KEEP_S, MAX_PER_USER, TaskStore
from contracts import ErrorCode, TaskOutcome, TaskState
from tests.bridge.fake_backend import TOKEN, FakeBackend, Receive, Recorded, Scope, Send
from tests.bridge.fake_backend import _json as reply_json
from tests.bridge.fake_backend import _read_body as read_body
from tests.bridge.harness import Client, RunningBridge, connected, new_id, running_bridge
from tests.support.tasks import roles, task_of


class TaskBackend(FakeBackend):
    """``FakeBackend`` plus the batch routes: ``POST /chat/tasks``, ``GET /chat/tasks/{id}``."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: tuple[int, str, str | None] | None = None  # (status, code, Retry-After)
        self.tasks: dict[str, dict[str, Any]] = {}
        self.status_delay_s = 0.0  # before answering GET /chat/tasks/{id}

    def task_calls(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith("/chat/tasks")]

    def finish(self, task_id: str, content: str = "the long answer") -> dict[str, Any]:
        """Mark the task done (as the backend's worker would); its TaskOutcome as published."""
        task = self.tasks[task_id]
        task.update(status="done", messageId=f"a-{task_id}", content=content)
        return {
            "taskId": task_id, "userId": task["userId"], "roomId": task["roomId"],
            "status": "done", "messageId": task["messageId"],
            "message": {
                "id": task["messageId"], "requestId": task_id, "role": "assistant",
                "content": content, "createdAt": "2026-01-01T00:00:00Z",
            },
        }  # fmt: skip

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/chat/tasks"):
            return await super()._app(scope, receive, send)
        body = await read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = parse_qs(scope.get("query_string", b"").decode())
        parsed = json.loads(body) if body else None
        self.requests.append(Recorded(scope["method"], path, headers, query, parsed))
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return await reply_json(send, 401, {"code": "UNAUTHORIZED", "message": "token"})
        if scope["method"] == "POST" and path == "/chat/tasks":
            assert parsed is not None
            if self.refuse is not None:
                status, code, after = self.refuse
                extra = () if after is None else ((b"retry-after", after.encode()),)
                return await reply_json(send, status, {"code": code, "message": "no"}, extra)
            rid = parsed["requestId"]
            task = self.tasks.setdefault(
                rid, {"userId": parsed["userId"], "roomId": parsed["roomId"], "status": "queued"}
            )
            user_message = {
                "id": f"u-{rid}", "requestId": rid, "role": "user", "content": parsed["content"],
                "userId": parsed["userId"], "createdAt": "2026-01-01T00:00:00Z",
            }  # fmt: skip
            reply = {"taskId": rid, "status": task["status"], "userMessage": user_message}
            return await reply_json(send, 202, reply)
        task_id = path.rsplit("/", 1)[-1]
        if self.status_delay_s:
            await asyncio.sleep(self.status_delay_s)
        task = self.tasks.get(task_id)
        if task is None or query.get("userId") != [task["userId"]]:
            return await reply_json(send, 404, {"code": "NOT_FOUND", "message": "no such task"})
        status = {k: v for k, v in task.items() if k != "userId"}
        return await reply_json(send, 200, {"taskId": task_id, **status})


@pytest.fixture
async def fake() -> AsyncIterator[TaskBackend]:
    async with TaskBackend() as backend:
        yield backend


@pytest.fixture
async def pair(redis_url: str, fake: TaskBackend) -> AsyncIterator[tuple[RunningBridge, ...]]:
    """Two bridge replicas on one Redis and Socket.IO channel, both subscribed to outcomes."""
    env = {"BRIDGE_CHANNEL": f"tasks-{uuid.uuid4().hex[:8]}"}
    async with AsyncExitStack() as stack:
        bridges = tuple(
            [await stack.enter_async_context(running_bridge(redis_url, fake.url, TOKEN, env))
             for _ in range(2)]
        )  # fmt: skip
        deadline = time.monotonic() + 5
        while not all(b.bridge.tasks.subscribed for b in bridges):
            assert time.monotonic() < deadline, "not subscribed to the outcomes"
            await asyncio.sleep(0.02)
        yield bridges


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def _until(predicate: Any, wait_s: float = 10.0) -> None:
    deadline = time.monotonic() + wait_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _batch(client: Client, room: str, content: str = "explain it at length") -> Any:
    rid = new_id("task")
    return await client.call(
        "send_message", {"roomId": room, "content": content, "requestId": rid, "mode": "batch"}
    )


async def _share(owner: Client, room: str, *others: tuple[Client, str]) -> None:
    assert (await owner.call("join_room", {"roomId": room}))["ok"] is True
    for client, user in others:
        if user:
            assert (await owner.call("add_member", {"roomId": room, "userId": user}))["ok"]
        assert (await client.call("join_room", {"roomId": room}))["ok"] is True


async def test_unknown_mode_is_invalid_payload_and_nothing_reaches_the_backend(
    pair: tuple[RunningBridge, ...], fake: TaskBackend
) -> None:
    one, _ = pair
    room = new_id("room")
    async with connected(one.url, new_id("alice")) as alice:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        for mode in ("later", "", 1, None, "BATCH"):
            ack = await alice.call("send_message", {"roomId": room, "content": "hi", "mode": mode})
            assert ack["ok"] is False and ack["code"] == "INVALID_PAYLOAD", (mode, ack)
        assert fake.task_calls() == [] and fake.calls("POST", "/chat/messages") == []
        assert "new_message" not in alice.names()


async def test_a_backend_refusal_is_a_rejected_ack_and_the_task_is_not_pending(
    pair: tuple[RunningBridge, ...], fake: TaskBackend
) -> None:
    one, _ = pair
    room = new_id("room")
    fake.refuse = (429, "BUDGET_EXCEEDED", "7")
    async with connected(one.url, new_id("alice")) as alice:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        ack = await _batch(alice, room)
        assert ack["ok"] is False and ack["stage"] == "rejected", ack
        assert ack["code"] == "BUDGET_EXCEEDED" and ack["retryAfterMs"] == 7000
        assert ack["requestId"]
        joined = await alice.call("join_room", {"roomId": room})
        assert joined["pendingTasks"] == []
        assert "new_message" not in alice.names()


async def test_an_online_sender_and_a_member_on_two_replicas_get_each_event_once(
    pair: tuple[RunningBridge, ...], fake: TaskBackend, redis: Redis
) -> None:
    one, two = pair
    room, alice_id, bob_id = new_id("room"), new_id("alice"), new_id("bob")
    async with (
        connected(one.url, alice_id) as a1,
        connected(two.url, alice_id) as a2,
        connected(two.url, alice_id) as elsewhere,  # alice's socket in no room at all
        connected(two.url, bob_id) as bob,
    ):
        await _share(a1, room, (a2, ""), (bob, bob_id))
        started = time.monotonic()
        ack = await _batch(a1, room)
        assert time.monotonic() - started < 1.0
        rid = ack["requestId"]
        assert ack == {
            "ok": True, "stage": "accepted", "requestId": rid, "roomId": room,
            "messageId": None, "path": "batch", "taskId": rid,
        }  # fmt: skip
        for client in (a1, a2, bob):  # the user's message, at once, on both replicas
            await _until(lambda c=client: roles(c, rid) == ["user"], 3)
        joined = await a2.call("join_room", {"roomId": room})
        assert joined["pendingTasks"] == [rid]
        outcome = json.dumps(fake.finish(rid))
        # published twice (the backend publishes once; a second must change nothing)
        for _ in range(2):
            await redis.publish(CHANNEL, outcome)
        for client in (a1, a2, elsewhere):
            await _until(lambda c=client: len(task_of(c, "task_done", rid)) == 1)
        await _until(lambda: roles(bob, rid) == ["user", "assistant"])
        await asyncio.sleep(0.5)
        for client in (a1, a2, bob):
            assert roles(client, rid) == ["user", "assistant"], client.names()
        assert roles(elsewhere, rid) == []
        for client in (a1, a2, elsewhere):
            assert task_of(client, "task_done", rid) == [
                {"taskId": rid, "roomId": room, "messageId": f"a-{rid}", "ok": True}
            ]
        assert task_of(bob, "task_done", rid) == []
        (reply,) = [m for m in task_of(bob, "new_message", rid) if m["message"]["role"] != "user"]
        assert reply["message"]["content"] == "the long answer"
        # delivered live (queued on open sockets): a later join, or a new socket, is not
        # told again
        deadline = time.monotonic() + 3
        while await redis.hexists(f"bridge:tasks:{alice_id}:outcomes", rid):
            assert time.monotonic() < deadline, "the live delivery kept the record"
            await asyncio.sleep(0.05)
        again = await a1.call("join_room", {"roomId": room})
        assert again["pendingTasks"] == []
        async with connected(one.url, alice_id) as later:
            assert (await later.call("join_room", {"roomId": room}))["pendingTasks"] == []
            await asyncio.sleep(0.3)
            assert task_of(later, "task_done", rid) == []
        assert len(task_of(a1, "task_done", rid)) == 1
        assert await redis.exists(f"bridge:task:delivered:{alice_id}:{rid}") == 1
        assert await redis.zscore(f"bridge:tasks:{alice_id}", rid) is None


async def test_an_offline_sender_gets_the_outcome_once_on_the_next_join(
    pair: tuple[RunningBridge, ...], fake: TaskBackend, redis: Redis
) -> None:
    one, two = pair
    room, alice_id, bob_id = new_id("room"), new_id("alice"), new_id("bob")
    async with connected(one.url, bob_id) as bob:
        async with connected(one.url, alice_id) as alice:
            await _share(alice, room, (bob, bob_id))
            ack = await _batch(alice, room)
            rid = ack["requestId"]
            await _until(lambda: roles(alice, rid) == ["user"], 3)
        await redis.publish(CHANNEL, json.dumps(fake.finish(rid)))
        await _until(lambda: roles(bob, rid) == ["user", "assistant"])  # the room, live
        assert await redis.hexists(f"bridge:tasks:{alice_id}:outcomes", rid)
        # back, on the other replica, in another room first: the outcome, once, after the ack
        other = new_id("room")
        async with connected(two.url, alice_id) as back, connected(two.url, alice_id) as tab:
            joined = await back.call("join_room", {"roomId": other})
            assert joined["ok"] is True and joined["pendingTasks"] == []
            await _until(lambda: len(task_of(back, "task_done", rid)) == 1)
            assert task_of(back, "new_message", rid) == []  # not in the task's room
            again = await back.call("join_room", {"roomId": room})
            assert again["pendingTasks"] == []
            assert (await tab.call("join_room", {"roomId": room}))["ok"] is True
            await asyncio.sleep(0.5)
            assert (
                len(task_of(back, "task_done", rid)) == 1 and task_of(tab, "task_done", rid) == []
            )
        assert await redis.hlen(f"bridge:tasks:{alice_id}:outcomes") == 0
        assert roles(bob, rid) == ["user", "assistant"]


async def test_an_offline_sender_joining_the_tasks_room_gets_the_answer_too(
    pair: tuple[RunningBridge, ...], fake: TaskBackend, redis: Redis
) -> None:
    one, two = pair
    room, alice_id = new_id("room"), new_id("alice")
    async with connected(one.url, alice_id) as alice:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        rid = (await _batch(alice, room))["requestId"]
    await redis.publish(CHANNEL, json.dumps(fake.finish(rid)))
    deadline = time.monotonic() + 5
    while not await redis.hexists(f"bridge:tasks:{alice_id}:outcomes", rid):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    async with connected(two.url, alice_id) as back:
        assert (await back.call("join_room", {"roomId": room}))["pendingTasks"] == []
        await _until(lambda: len(task_of(back, "task_done", rid)) == 1)
        assert roles(back, rid) == ["assistant"]
        names = [n for n, d in back.events if n in ("new_message", "task_done")]
        assert names == ["new_message", "task_done"]  # the answer, then its task_done


async def test_an_outcome_no_replica_heard_is_delivered_on_join(
    pair: tuple[RunningBridge, ...], fake: TaskBackend, redis: Redis
) -> None:
    one, two = pair
    room, alice_id, bob_id = new_id("room"), new_id("alice"), new_id("bob")
    async with connected(two.url, bob_id) as bob:
        async with connected(one.url, alice_id) as alice:
            await _share(alice, room, (bob, bob_id))
            rid = (await _batch(alice, room))["requestId"]
        fake.finish(rid, "answered while nobody listened")  # done, never published
        async with connected(one.url, alice_id) as back:
            joined = await back.call("join_room", {"roomId": room})
            assert joined["pendingTasks"] == [rid]  # unfinished as far as the bridge knew
            await _until(lambda: len(task_of(back, "task_done", rid)) == 1)
            assert roles(back, rid) == ["assistant"]
            await _until(lambda: roles(bob, rid) == ["user", "assistant"])
            assert (await back.call("join_room", {"roomId": room}))["pendingTasks"] == []
            await asyncio.sleep(0.3)
            assert len(task_of(back, "task_done", rid)) == 1
            assert roles(bob, rid).count("assistant") == 1
        # published late after all: nothing more
        await redis.publish(CHANNEL, json.dumps(fake.finish(rid)))
        await asyncio.sleep(0.3)
        assert roles(bob, rid) == ["user", "assistant"]


async def test_a_resent_request_id_of_an_ended_task_tells_that_socket_again(
    pair: tuple[RunningBridge, ...], fake: TaskBackend, redis: Redis
) -> None:
    one, two = pair
    room, alice_id = new_id("room"), new_id("alice")
    async with connected(one.url, alice_id) as a1, connected(two.url, alice_id) as a2:
        await _share(a1, room, (a2, ""))
        ack = await _batch(a1, room)
        rid = ack["requestId"]
        await redis.publish(CHANNEL, json.dumps(fake.finish(rid)))
        for client in (a1, a2):
            await _until(lambda c=client: len(task_of(c, "task_done", rid)) == 1)
        again = await a2.call(
            "send_message",
            {"roomId": room, "content": "explain it at length", "requestId": rid, "mode": "batch"},
        )
        assert again["ok"] is True and again["taskId"] == rid
        await _until(lambda: len(task_of(a2, "task_done", rid)) == 2)
        await asyncio.sleep(0.3)
        assert len(task_of(a1, "task_done", rid)) == 1  # only the socket that asked again
        assert roles(a1, rid).count("assistant") == 1  # the answer is not sent twice
        assert len([t for t in fake.task_calls() if t.method == "POST"]) == 2


async def test_a_failed_task_is_a_task_done_with_its_code_and_no_answer(
    pair: tuple[RunningBridge, ...], fake: TaskBackend, redis: Redis
) -> None:
    one, _ = pair
    room, alice_id = new_id("room"), new_id("alice")
    async with connected(one.url, alice_id) as alice:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        rid = (await _batch(alice, room))["requestId"]
        failed = {"taskId": rid, "userId": alice_id, "roomId": room, "status": "failed",
                  "code": "MODEL_TIMEOUT"}  # fmt: skip
        await redis.publish(CHANNEL, json.dumps(failed))
        await _until(lambda: len(task_of(alice, "task_done", rid)) == 1)
        assert task_of(alice, "task_done", rid) == [
            {"taskId": rid, "roomId": room, "messageId": None, "ok": False,
             "code": "MODEL_TIMEOUT"}
        ]  # fmt: skip
        assert roles(alice, rid) == ["user"]


async def test_a_task_the_backend_does_not_know_is_dropped_from_pending(
    pair: tuple[RunningBridge, ...], fake: TaskBackend
) -> None:
    one, _ = pair
    room, alice_id = new_id("room"), new_id("alice")
    async with connected(one.url, alice_id) as alice:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        rid = (await _batch(alice, room))["requestId"]
        del fake.tasks[rid]  # expired on the backend: 404
        assert (await alice.call("join_room", {"roomId": room}))["pendingTasks"] == [rid]
        await asyncio.sleep(0.3)
        assert (await alice.call("join_room", {"roomId": room}))["pendingTasks"] == []


async def test_a_client_looping_join_room_starts_one_recovery_at_a_time_and_rarely(
    pair: tuple[RunningBridge, ...], fake: TaskBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, _ = pair
    room, alice_id = new_id("room"), new_id("alice")

    def status_calls() -> int:
        return len([r for r in fake.task_calls() if r.method == "GET"])

    async with connected(one.url, alice_id) as alice:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        rid = (await _batch(alice, room))["requestId"]  # queued: each join finds it unfinished
        for _ in range(20):
            assert (await alice.call("join_room", {"roomId": room}))["pendingTasks"] == [rid]
        await asyncio.sleep(0.3)
        assert status_calls() == 1  # one recovery per RECOVER_EVERY_S (10 s) per user
        # a slow backend: one recovery in progress at a time, also past RECOVER_EVERY_S
        monkeypatch.setattr(bridge_tasks, "RECOVER_EVERY_S", 0.2)
        fake.status_delay_s = 2.0
        for _ in range(10):
            await alice.call("join_room", {"roomId": room})
            await asyncio.sleep(0.05)
        await _until(lambda: status_calls() >= 2)
        await asyncio.sleep(0.3)
        assert status_calls() == 2
        fake.status_delay_s = 0.0
        await _until(lambda: not one.bridge.tasks._recovering_users, 5)
        await asyncio.sleep(0.25)
        await alice.call("join_room", {"roomId": room})  # its time again
        await _until(lambda: status_calls() == 3)
    assert len(one.bridge.tasks._recovered_at) <= 1


# ---- the store alone --------------------------------------------------------------------


def _outcome(user: str, task: str) -> TaskOutcome:
    return TaskOutcome(
        task_id=task, user_id=user, room_id="room-x", status=TaskState.FAILED,
        code=ErrorCode.MODEL_TIMEOUT,
    )  # fmt: skip


async def test_one_recorder_and_one_taker_win_under_concurrency(redis: Redis) -> None:
    stores = [TaskStore(redis) for _ in range(4)]
    user, task = new_id("u"), new_id("t")
    await stores[0].track(user, task)
    won = await asyncio.gather(*(s.record(_outcome(user, task)) for s in stores for _ in range(5)))
    assert won.count(True) == 1
    taken = await asyncio.gather(*(s.at_join(user) for s in stores))
    assert sum(len(t) for _, t in taken) == 1
    assert all(unfinished == [] for unfinished, _ in taken)


async def test_the_store_is_bounded_and_expires(redis: Redis) -> None:
    store, user = TaskStore(redis), new_id("u")
    tasks = [f"t{i:03d}" for i in range(MAX_PER_USER + 30)]
    for task in tasks:
        await store.track(user, task)
    for task in tasks[-10:]:
        assert await store.record(_outcome(user, task))
    assert await redis.zcard(f"bridge:tasks:{user}") == MAX_PER_USER
    unfinished, _ = await TaskStore(redis).at_join(user)
    assert unfinished == tasks[30:-10]  # the oldest dropped, the finished ones taken
    assert 0 < await redis.ttl(f"bridge:tasks:{user}") <= KEEP_S
    # the delivery marker outlives the backend's task record: a requestId resent while the
    # backend still has the ended task is not delivered again
    marker_ttl = await redis.ttl(f"bridge:task:delivered:{user}:{tasks[-1]}")
    assert DEFAULT_TASK_TTL_S < marker_ttl <= DELIVERED_KEEP_S
