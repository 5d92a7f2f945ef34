"""A batch answer outlives every bridge replica (issue 12): the task ends while no bridge runs,
so its ``bs:tasks:done`` publication reaches nobody; the sender's next ``join_room`` on a new
bridge finds it finished (``GET /chat/tasks``) and it is delivered then, once.

Its own module: no other bridge of the suite may be subscribed while the task ends.
"""

from __future__ import annotations

import asyncio
import time

from tests.bridge.harness import connected, new_id
from tests.integration.conftest import bridge_env
from tests.integration.test_batch import SLOW, backend_task, history, send_batch, until
from tests.support.procs import ServerProcess
from tests.support.tasks import roles, task_of


async def test_an_outcome_published_while_no_bridge_ran_is_delivered_on_the_next_join(
    redis_url: str, backend: ServerProcess
) -> None:
    alice_id, room = new_id("alice"), new_id("room")
    env = bridge_env(redis_url, backend)
    with ServerProcess.python_module("bridge", env=env) as first:
        async with connected(first.url, alice_id) as alice:
            assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
            rid = (await send_batch(alice, room, SLOW))["requestId"]
            await until(lambda: roles(alice, rid) == ["user"], 3, "the user's new_message")
    # no bridge runs now; the job goes on and ends on the backend
    deadline = time.monotonic() + 30
    while True:
        status = backend_task(backend.url, rid, alice_id).json()
        if status["status"] in ("done", "failed"):
            break
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.1)
    assert status["status"] == "done"
    with ServerProcess.python_module("bridge", env=env) as second:
        async with connected(second.url, alice_id) as back:
            joined = await back.call("join_room", {"roomId": room})
            assert joined["pendingTasks"] == [rid]  # as far as any bridge knew, unfinished
            await until(lambda: len(task_of(back, "task_done", rid)) == 1, 10, "task_done")
            assert task_of(back, "task_done", rid) == [
                {"taskId": rid, "roomId": room, "messageId": status["messageId"], "ok": True}
            ]
            assert roles(back, rid) == ["assistant"]
            assert task_of(back, "new_message", rid)[0]["message"]["content"] == status["content"]
            assert (await back.call("join_room", {"roomId": room}))["pendingTasks"] == []
        async with connected(second.url, alice_id) as again:
            assert (await again.call("join_room", {"roomId": room}))["pendingTasks"] == []
            await asyncio.sleep(0.7)
            assert "task_done" not in again.names()
        messages = history(second.url, room, alice_id)
        assert [(m["role"], m["requestId"]) for m in messages] == [
            ("user", rid), ("assistant", rid),
        ]  # fmt: skip
