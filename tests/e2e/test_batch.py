"""Batch mode with the official socket.io-client v4 (Node) against a real bridge and backend:
the ack at once, the user's message at once, nothing more; the sender leaves; when it comes
back after the job ended, its join gets the ack, then the answer and ``task_done``, once."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from redis import Redis

from tests.bridge.harness import token
from tests.e2e.node import events, of, run_scenario

pytestmark = pytest.mark.e2e

SLOW = "[[tps=20]] [[tokens=30]] a long, careful answer"


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _task(url: str, task_id: str, user: str) -> dict[str, Any]:
    reply = httpx.get(
        f"{url}/tasks/{task_id}", headers={"Authorization": f"Bearer {token(user)}"}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def _kinds(records: list[dict[str, Any]], socket: str) -> list[str]:
    """What one socket saw, in arrival order: acks by event, events by name."""
    return [
        f"ack:{r.get('label') or r['event']}" if r["kind"] == "ack" else r["event"]
        for r in of(records, socket)
        if r["kind"] in ("ack", "event") and r.get("event") != "room_event"
    ]


def test_batch_ack_at_once_then_the_outcome_once_after_the_senders_next_join(
    bridge_url: str, redis_url: str
) -> None:
    user, room, rid = _id("user"), _id("room"), _id("task")
    auth = {"token": token(user)}
    sent = run_scenario(
        {
            "url": bridge_url,
            "sockets": {"a": {"auth": auth}},
            "steps": [
                {"do": "connect", "socket": "a"},
                {
                    "do": "emit",
                    "socket": "a",
                    "event": "join_room",
                    "args": [{"roomId": room}],
                    "label": "join",
                },
                {
                    "do": "emit",
                    "socket": "a",
                    "event": "send_message",
                    "label": "send",
                    "args": [{"roomId": room, "content": SLOW, "requestId": rid, "mode": "batch"}],
                },
                {"do": "waitFor", "socket": "a", "event": "new_message"},
                {"do": "sleep", "ms": 300},
                {"do": "disconnect", "socket": "a"},
            ],
        }  # fmt: skip
    )
    assert _kinds(sent, "a") == ["ack:join", "ack:send", "new_message"]
    ack = next(r for r in of(sent, "a") if r["kind"] == "ack" and r.get("label") == "send")
    assert ack["data"] == {
        "ok": True, "stage": "accepted", "requestId": rid, "roomId": room, "messageId": None,
        "path": "batch", "taskId": rid,
    }  # fmt: skip
    (user_message,) = events(sent, "a", "new_message")
    assert user_message["message"]["role"] == "user"
    assert user_message["message"]["content"] == SLOW
    # the sender is gone; the job ends meanwhile
    deadline = time.monotonic() + 30
    while (status := _task(bridge_url, rid, user))["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status["status"] == "done" and status["content"]
    with Redis.from_url(redis_url, decode_responses=True) as redis:  # the bridge recorded it
        while not redis.hexists(f"bridge:tasks:{user}:outcomes", rid):
            assert time.monotonic() < deadline, "the published outcome was not recorded"
            time.sleep(0.02)
    back = run_scenario(
        {
            "url": bridge_url,
            "sockets": {"b": {"auth": auth}, "c": {"auth": auth, "transports": ["polling"]}},
            "steps": [
                {"do": "connect", "socket": "b"},
                {
                    "do": "emit",
                    "socket": "b",
                    "event": "join_room",
                    "args": [{"roomId": room}],
                    "label": "join",
                },
                {"do": "waitFor", "socket": "b", "event": "task_done"},
                {
                    "do": "emit",
                    "socket": "b",
                    "event": "join_room",
                    "args": [{"roomId": room}],
                    "label": "again",
                },
                {"do": "connect", "socket": "c"},
                {
                    "do": "emit",
                    "socket": "c",
                    "event": "join_room",
                    "args": [{"roomId": room}],
                    "label": "join",
                },
                {"do": "sleep", "ms": 700},
            ],
        }  # fmt: skip
    )
    assert _kinds(back, "b") == ["ack:join", "new_message", "task_done", "ack:again"]
    joins = [r["data"] for r in of(back, "b") if r["kind"] == "ack"]
    assert [j["pendingTasks"] for j in joins] == [[], []]
    (answer,) = events(back, "b", "new_message")
    assert answer["message"]["role"] == "assistant"
    assert answer["message"]["content"] == status["content"]
    assert events(back, "b", "task_done") == [
        {"taskId": rid, "roomId": room, "messageId": status["messageId"], "ok": True}
    ]
    assert _kinds(back, "c") == ["ack:join"]  # a second socket is not told again
