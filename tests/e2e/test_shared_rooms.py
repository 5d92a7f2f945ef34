"""Rooms people share, at once (issue 11): many rooms of four members on two bridge replicas,
the official socket.io-client under Node, the real backend's per-room lock and the real Redis.

Every member asks the AI (``[[recall=1]]``: the scripted model answers with what its prompt
held, ``seen <n> <digest of the earlier answers>``) and posts a message to the others, all at
once. Then, in every room: the stored history holds each AI exchange whole (question, then its
answer) in acceptance order, every answer saw all the earlier ones complete, every post once;
every member's socket saw the same events for every request; nothing lost or doubled.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx

from bridge.auth import make_token
from tests.bridge.harness import JWT_SECRET, new_id
from tests.e2e.node import events, of, run_scenario
from tests.support.recall import recalled

MEMBERS = 4
STREAM_EVENTS = ("ai_message_start", "ai_message_chunk", "ai_message_end", "ai_message_error")


def history(url: str, room: str, user: str) -> list[dict[str, Any]]:
    bearer = make_token(JWT_SECRET, user, rooms=[room])
    resp = httpx.get(
        f"{url}/rooms/{room}/messages",
        params={"limit": 200},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    messages: list[dict[str, Any]] = resp.json()["messages"]
    return messages


def emit_now(
    socket: str, event: str, label: str, room: str, content: str, timeout_ms: int = 60_000
) -> dict[str, Any]:
    """A scenario step that sends ``event`` to ``room`` without waiting for its ack (the ack
    is recorded when it comes, under ``label``)."""
    payload = {"roomId": room, "requestId": new_id(label), "content": content}
    return {"do": "emit", "socket": socket, "event": event, "wait": False, "label": label,
            "timeoutMs": timeout_ms, "args": [payload]}  # fmt: skip


def per_request(records: list[dict[str, Any]], socket: str) -> dict[str, list[tuple[Any, ...]]]:
    """The socket's stream events, by requestId, in arrival order."""
    seen: dict[str, list[tuple[Any, ...]]] = {}
    for r in of(records, socket):
        if r["kind"] == "event" and r["event"] in STREAM_EVENTS:
            d = r["data"]
            seen.setdefault(d["requestId"], []).append(
                (r["event"], d.get("seq"), d.get("chunk"), d.get("content"))
            )
    return seen


def test_fifty_rooms_of_four_members_at_once_keep_order_and_lose_nothing(
    bridge_url: str, second_bridge_url: str
) -> None:
    rooms = [new_id("shared") for _ in range(50)]
    sockets: dict[str, dict[str, Any]] = {}
    users: dict[str, str] = {}
    for i, room in enumerate(rooms):
        for j in range(MEMBERS):
            name = f"r{i}m{j}"
            users[name] = new_id(f"u{i}-{j}")
            sockets[name] = {
                "auth": {"token": make_token(JWT_SECRET, users[name], rooms=[room])},
                "url": bridge_url if j % 2 == 0 else second_bridge_url,
            }
    steps: list[dict[str, Any]] = [{"do": "connect", "socket": s} for s in sockets]
    for i, room in enumerate(rooms):
        for j in range(MEMBERS):
            steps.append(
                {"do": "emit", "socket": f"r{i}m{j}", "event": "join_room",
                 "args": [{"roomId": room}]}
            )  # fmt: skip
    for i, room in enumerate(rooms):  # all at once: nothing waits for an ack here
        for j in range(MEMBERS):
            name = f"r{i}m{j}"
            question = f"question {i}.{j} [[recall=1]] [[tps=100]]"
            steps.append(emit_now(name, "send_message", "send", room, question))
            steps.append(emit_now(name, "post_message", "post", room, f"hello from {users[name]}"))
    for name in sockets:
        steps.append(
            {"do": "waitFor", "socket": name, "event": "ai_message_end", "count": MEMBERS,
             "timeoutMs": 90_000}
        )  # fmt: skip
        steps.append(
            {"do": "waitFor", "socket": name, "event": "new_message", "count": 2 * MEMBERS,
             "timeoutMs": 30_000}
        )  # fmt: skip
    records = run_scenario({"url": bridge_url, "sockets": sockets, "steps": steps}, timeout_s=240)

    acks = [r for r in records if r["kind"] in ("ack", "ack_timeout") and r.get("label")]
    assert [r["kind"] for r in acks].count("ack") == 2 * len(sockets)
    assert all(r["data"]["ok"] is True for r in acks), [r for r in acks if not r["data"]["ok"]]
    for i, room in enumerate(rooms):
        names = [f"r{i}m{j}" for j in range(MEMBERS)]
        # The same events for every request on every member's socket (both replicas).
        views = [per_request(records, n) for n in names]
        assert len(views[0]) == MEMBERS and all(v == views[0] for v in views), room
        for n in names:
            assert len(events(records, n, "ai_message_end")) == MEMBERS
            posts = [m for m in events(records, n, "new_message")]
            assert len(posts) == 2 * MEMBERS
            assert len({p["message"]["id"] for p in posts}) == 2 * MEMBERS  # none doubled
        messages = history(bridge_url if i % 2 else second_bridge_url, room, users[names[0]])
        assert len(messages) == 3 * MEMBERS, [m["content"] for m in messages]
        posted = [m for m in messages if m["id"].startswith("p-")]
        assert Counter(m["userId"] for m in posted) == Counter(users[n] for n in names)
        exchange = [m for m in messages if not m["id"].startswith("p-")]
        assert [m["role"] for m in exchange] == ["user", "assistant"] * MEMBERS
        answers: list[str] = []
        for question, answer in zip(exchange[::2], exchange[1::2], strict=True):
            assert question["requestId"] == answer["requestId"]
            assert answer["content"] == recalled(answers)  # saw every earlier answer whole
            answers.append(answer["content"])
        # The room's stream shows the same answers, in the same order.
        ends = [e for e in views[0].values()]
        assert sorted(e[-1][3] for e in ends) == sorted(answers)


def test_a_full_room_queue_refuses_the_next_send_with_room_busy(bridge_url: str) -> None:
    """One answer runs, ROOM_QUEUE_MAX (5) wait, the seventh send is refused, retryable."""
    user, room = new_id("busy"), new_id("busyroom")
    steps: list[dict[str, Any]] = [
        {"do": "connect", "socket": "a"},
        {"do": "emit", "socket": "a", "event": "join_room", "args": [{"roomId": room}]},
    ]
    for i in range(7):
        steps.append(
            emit_now(
                "a", "send_message", f"send{i}", room, f"q{i} [[tps=40]] [[tokens=20]]", 30_000
            )
        )
    steps.append(
        {"do": "waitFor", "socket": "a", "event": "ai_message_end", "count": 6,
         "timeoutMs": 60_000}
    )  # fmt: skip
    token = make_token(JWT_SECRET, user)
    records = run_scenario(
        {"url": bridge_url, "sockets": {"a": {"auth": {"token": token}}}, "steps": steps},
        timeout_s=90,
    )
    sends = [r["data"] for r in records if r["kind"] == "ack" and r["event"] == "send_message"]
    assert len(sends) == 7
    refused = [a for a in sends if not a["ok"]]
    assert len(refused) == 1, sends
    assert refused[0]["code"] == "ROOM_BUSY" and refused[0]["retryAfterMs"] > 0
    starts = events(records, "a", "ai_message_start")
    assert sorted(s.get("queuePosition", 0) for s in starts) == [0, 1, 2, 3, 4, 5]
    assert len(events(records, "a", "ai_message_end")) == 6
    assert not events(records, "a", "ai_message_error")
