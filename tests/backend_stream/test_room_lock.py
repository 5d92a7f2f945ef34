"""One generation at a time per room, in acceptance order (CONTRACT.md "Rooms and members"):
the backend's per-room lock in the real Redis, with real backend processes.

The scripted model's ``[[recall=1]]`` answers ``seen <n> <digest>``: how many assistant
messages its prompt held and a digest of them, so a test can tell that each prompt saw every
earlier answer of the room whole.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from typing import Any

import httpx
import httpx_sse
import pytest

from tests.backend_stream.conftest import Backend, metric, parse_frames, start_backend
from tests.backend_stream.test_registry import history
from tests.support.recall import recalled


def ask(room_id: str, content: str, user: str | None = None) -> dict[str, str]:
    tag = uuid.uuid4().hex[:10]
    return {
        "requestId": f"r-{tag}",
        "roomId": room_id,
        "userId": user or f"user-{tag}",
        "content": content,
    }


def new_room() -> str:
    return f"room-{uuid.uuid4().hex[:10]}"


async def stream(client: httpx.AsyncClient, payload: dict[str, str]) -> list[dict[str, str]]:
    resp = await client.post("/chat/messages/stream", json=payload)
    assert resp.status_code == 200, resp.text
    return parse_frames(resp.content)


def data(frame: dict[str, str]) -> Any:
    return json.loads(frame["data"])


def check_alternates(messages: list[dict[str, Any]]) -> None:
    """Every AI exchange is its user message, then its answer, with none in between."""
    ai = [m for m in messages if not m["id"].startswith("p-")]
    roles = [m["role"] for m in ai]
    assert roles == ["user", "assistant"] * (len(ai) // 2), roles
    for question, answer in zip(ai[::2], ai[1::2], strict=True):
        assert question["requestId"] == answer["requestId"]


async def test_requests_in_one_room_run_one_at_a_time_in_acceptance_order(
    backend: Backend, backend_b: Backend
) -> None:
    room = new_room()
    # [[recall=1]] answers in 3 tokens: at 5 per second each answer outlasts the 4 sends
    payloads = [ask(room, f"question {i} [[recall=1]] [[tps=5]]") for i in range(4)]
    async with backend.client() as a, backend_b.client() as b:
        tasks = []
        for i, payload in enumerate(payloads):  # accepted in this order, on two replicas
            client = a if i % 2 == 0 else b
            tasks.append(asyncio.create_task(stream(client, payload)))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks)
        messages = await history(a, room)
    starts = [data(r[0]) for r in results]
    assert "queuePosition" not in starts[0]
    assert [s.get("queuePosition") for s in starts[1:]] == [1, 2, 3]
    ends = [data(r[-1]) for r in results]
    assert [r[-1]["event"] for r in results] == ["end"] * 4
    # Each answer saw every earlier answer complete, in acceptance order.
    answers: list[str] = []
    for end in ends:
        assert end["content"] == recalled(answers)
        answers.append(end["content"])
    check_alternates(messages)
    assert [m["requestId"] for m in messages[::2]] == [p["requestId"] for p in payloads]
    # A waiter sees pings while it waits, and its chunks only after the one ahead ended.
    assert any("comment" in f for f in results[3])
    assert metric(backend.url, "backend_room_wait_seconds_count") >= 1


async def test_rooms_do_not_wait_for_each_other(backend: Backend) -> None:
    async with backend.client() as a:
        slow = asyncio.create_task(stream(a, ask(new_room(), "slow [[tps=10]] [[tokens=10]]")))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        other = await stream(a, ask(new_room(), "quick [[tokens=2]]"))
        took = time.monotonic() - began
        await slow
    assert "queuePosition" not in data(other[0]) and took < 0.8


async def test_a_full_queue_refuses_with_room_busy_and_retry_after(redis_url: str) -> None:
    small = Backend(start_backend(redis_url, ROOM_QUEUE_MAX="2", ROOM_BUSY_RETRY_S="3"))
    room = new_room()
    try:
        async with small.client() as c:
            running = [
                asyncio.create_task(stream(c, ask(room, f"q{i} [[tps=20]] [[tokens=8]]")))
                for i in range(3)
            ]
            await asyncio.sleep(0.3)  # one runs, two wait: the queue is full
            refused = await c.post("/chat/messages/stream", json=ask(room, "one too many"))
            complete = await c.post("/chat/messages", json=ask(room, "complete too"))
            assert [r[-1]["event"] for r in await asyncio.gather(*running)] == ["end"] * 3
            again = await stream(c, ask(room, "after the queue drained [[tokens=2]]"))
            messages = await history(c, room)
    finally:
        small.proc.stop()
    for resp in (refused, complete):
        assert resp.status_code == 429, resp.text
        assert resp.json()["code"] == "ROOM_BUSY" and resp.json()["retryable"] is True
        assert resp.headers["Retry-After"] == "3"
    assert again[-1]["event"] == "end"
    contents = [m["content"] for m in messages if m["role"] == "user"]
    assert "one too many" not in contents and "complete too" not in contents  # nothing stored
    check_alternates(messages)


async def test_a_cancelled_waiter_leaves_the_queue_and_stores_nothing(backend: Backend) -> None:
    room = new_room()
    async with backend.client() as a:
        first = asyncio.create_task(stream(a, ask(room, "first [[tps=20]] [[tokens=10]]")))
        await asyncio.sleep(0.1)
        waiter = ask(room, "never mind")
        waiting = asyncio.create_task(stream(a, waiter))
        await asyncio.sleep(0.1)
        third = asyncio.create_task(stream(a, ask(room, "third [[tokens=2]]")))
        await asyncio.sleep(0.1)
        cancel = await a.post(
            f"/chat/messages/{waiter['requestId']}/cancel", params={"userId": waiter["userId"]}
        )
        assert cancel.status_code == 200
        cancelled = await waiting
        assert [r[-1]["event"] for r in await asyncio.gather(first, third)] == ["end", "end"]
        messages = await history(a, room)
    assert data(cancelled[0])["queuePosition"] == 1
    assert data(cancelled[-1])["finishReason"] == "cancelled"
    assert waiter["requestId"] not in {m["requestId"] for m in messages}
    check_alternates(messages)
    assert len(messages) == 4


async def test_a_killed_holder_blocks_its_room_no_longer_than_the_lock_ttl(
    redis_url: str, backend_b: Backend
) -> None:
    ttl_s = 2.0
    holder = Backend(start_backend(redis_url, ROOM_LOCK_TTL_S=str(ttl_s)))
    room = new_room()
    try:
        async with holder.client() as h, backend_b.client() as b:
            async with httpx_sse.aconnect_sse(
                h, "POST", "/chat/messages/stream", json=ask(room, "long [[tps=5]] [[tokens=50]]")
            ) as source:
                events = source.aiter_sse()
                assert (await anext(events)).event == "start"
                assert (await anext(events)).event == "chunk"  # it holds the room
                holder.proc.kill()
                killed_at = time.monotonic()
            nxt = ask(room, "next [[tokens=3]]")
            async with httpx_sse.aconnect_sse(
                b, "POST", "/chat/messages/stream", json=nxt
            ) as source:
                events = source.aiter_sse()
                assert json.loads((await anext(events)).data)["queuePosition"] == 1
                first = await anext(events)
                ran_after = time.monotonic() - killed_at
                assert first.event == "chunk"
                assert [e.event async for e in events][-1] == "end"
    finally:
        holder.proc.stop()
    assert ran_after <= ttl_s + 0.5, ran_after  # the lock's TTL (+ the model's 40 ms TTFT)


async def test_a_stale_holder_cannot_write_after_its_lock_was_taken_over(
    redis_url: str, backend_b: Backend
) -> None:
    """Fencing: a holder frozen past its lock's TTL (a long GC pause, a stopped VM) wakes up
    after another generation took the room; its late answer is refused, not stored."""
    ttl_s = 1.0
    # Idle timeout long enough that the woken holder goes on to its end instead of timing out.
    holder = Backend(
        start_backend(redis_url, ROOM_LOCK_TTL_S=str(ttl_s), MODEL_IDLE_TIMEOUT_S="30")
    )
    assert holder.proc.proc is not None
    pid = holder.proc.proc.pid
    room = new_room()
    stale = ask(room, "stale [[tps=5]] [[tokens=20]]")
    try:
        async with holder.client() as h, backend_b.client() as b:
            async with httpx_sse.aconnect_sse(
                h, "POST", "/chat/messages/stream", json=stale
            ) as source:
                events = source.aiter_sse()
                assert (await anext(events)).event == "start"
                assert (await anext(events)).event == "chunk"
                os.kill(pid, signal.SIGSTOP)
                try:
                    took_over = await stream(b, ask(room, "took over [[tokens=3]]"))
                finally:
                    os.kill(pid, signal.SIGCONT)
                rest = [e async for e in events]
            messages = await history(b, room)
            lost = metric(holder.url, "backend_room_lock_lost_total")
    finally:
        holder.proc.stop()
    assert data(took_over[0])["queuePosition"] == 1 and took_over[-1]["event"] == "end"
    assert rest[-1].event == "error"
    assert json.loads(rest[-1].data)["code"] == "BACKEND_FAILED"
    assert lost == 1
    answers = [m for m in messages if m["role"] == "assistant"]
    assert [m["requestId"] for m in answers] == [data(took_over[0])["requestId"]]


@pytest.mark.parametrize("rooms", [50])
async def test_many_rooms_at_once_keep_their_order(
    backend: Backend, backend_b: Backend, rooms: int
) -> None:
    """``rooms`` rooms x 4 requests at once on two replicas: every room's history alternates
    in acceptance order and each answer saw all the earlier ones."""
    room_ids = [new_room() for _ in range(rooms)]
    limits = httpx.Limits(max_connections=1000)
    async with backend.client(limits=limits) as a, backend_b.client(limits=limits) as b:

        async def one_room(room: str) -> None:
            results = await asyncio.gather(
                *(
                    stream(a if i % 2 else b, ask(room, f"q{i} [[recall=1]] [[tps=200]]"))
                    for i in range(4)
                )
            )
            assert [r[-1]["event"] for r in results] == ["end"] * 4
            messages = await history(a, room)
            check_alternates(messages)
            assert len(messages) == 8
            answers: list[str] = []
            for message in messages[1::2]:
                assert message["content"] == recalled(answers)
                answers.append(message["content"])
            by_request = {data(r[0])["requestId"]: data(r[0]) for r in results}
            order = [m["requestId"] for m in messages[::2]]
            positions = [by_request[r].get("queuePosition", 0) for r in order]
            assert positions == sorted(positions)  # acceptance order is the running order

        await asyncio.gather(*(one_room(r) for r in room_ids))
