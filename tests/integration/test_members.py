"""Rooms people share (issue 11, first part): the owner's members, the JWT ``rooms`` claim, and
the same rules on join, send, cancel and the bridge's REST history; on two bridge replicas with
the real backend and Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from bridge.auth import make_token
from tests.bridge.harness import JWT_SECRET, Client, connected, new_id, token

SLOW = "[[tps=20]] [[tokens=40]] a long answer"


@asynccontextmanager
async def with_rooms(url: str, user: str, rooms: list[str]) -> AsyncIterator[Client]:
    client = Client()
    await client.connect(url, auth={"token": make_token(JWT_SECRET, user, rooms=rooms)})
    try:
        yield client
    finally:
        await client.close()


def _history(url: str, room: str, bearer: str | None) -> httpx.Response:
    headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
    return httpx.get(f"{url}/rooms/{room}/messages", headers=headers, timeout=10)


async def _ask(client: Client, room: str, content: str) -> dict[str, Any]:
    ack: dict[str, Any] = await client.call(
        "send_message", {"roomId": room, "content": content, "requestId": new_id("req")}
    )
    return ack


async def test_strangers_are_refused_everywhere_and_members_are_let_in(
    replicas: tuple[str, str],
) -> None:
    one, two = replicas
    owner, bob, eve = new_id("owner"), new_id("bob"), new_id("eve")
    room = new_id("room")
    async with connected(one, owner) as alice, connected(two, bob) as b, connected(two, eve) as e:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        done = await _ask(alice, room, "hello")
        assert done["ok"] is True
        await alice.wait_for("message_ack")
        # a stranger: join, send, history, and changing members are all refused
        for client in (b, e):
            refused = await client.call("join_room", {"roomId": room})
            assert refused["ok"] is False and refused["code"] == "FORBIDDEN"
            sent = await _ask(client, room, "let me in")
            assert sent["ok"] is False and sent["code"] == "FORBIDDEN"
        assert _history(one, room, token(eve)).status_code == 403
        assert _history(one, room, None).status_code == 401
        assert _history(one, room, "not-a-jwt").status_code == 401
        assert _history(one, "bad room id", token(owner)).status_code == 422
        for user in (eve, new_id("friend")):
            not_owner = await e.call("add_member", {"roomId": room, "userId": user})
            assert not_owner["ok"] is False and not_owner["code"] == "FORBIDDEN"
        bad = await alice.call("add_member", {"roomId": room, "userId": "not an id"})
        assert bad["ok"] is False and bad["code"] == "INVALID_PAYLOAD"
        # the owner reads the history over REST: the exchange, oldest first
        history = _history(two, room, token(owner))
        assert history.status_code == 200
        assert [m["role"] for m in history.json()["messages"]] == ["user", "assistant"]

        added = await alice.call("add_member", {"roomId": room, "userId": bob})
        assert added == {"ok": True, "roomId": room, "members": [bob]}
        (event,) = await alice.wait_for("room_event")  # (she is not told of her own "joined")
        assert event["type"] == "member_added" and event["userId"] == bob
        assert (await b.call("join_room", {"roomId": room}))["ok"] is True
        assert _history(one, room, token(bob)).status_code == 200
        assert _history(one, room, token(eve)).status_code == 403
        # bob (replica two) sees alice's (replica one) next answer stream
        assert (await _ask(alice, room, SLOW))["ok"] is True
        await b.wait_for("ai_message_end", wait_s=20)
        await alice.wait_for("message_ack", 2, wait_s=20)


async def test_a_removed_member_stops_receiving_at_once_and_is_refused(
    replicas: tuple[str, str],
) -> None:
    one, two = replicas
    owner, bob = new_id("owner"), new_id("bob")
    room = new_id("room")
    async with (
        connected(one, owner) as alice,
        connected(two, bob) as b1,
        connected(one, bob) as b2,
    ):
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        assert (await alice.call("add_member", {"roomId": room, "userId": bob}))["ok"] is True
        for tab in (b1, b2):
            assert (await tab.call("join_room", {"roomId": room}))["ok"] is True
        ack = await _ask(alice, room, SLOW)
        assert ack["ok"] is True
        rid = ack["requestId"]
        await b1.wait_for("ai_message_chunk", 2)
        # bob may not cancel alice's request: the backend scopes it to its sender
        cancel = await b1.call("cancel_message", {"requestId": rid})
        assert cancel["ok"] is False
        removed = await alice.call("remove_member", {"roomId": room, "userId": bob})
        assert removed == {"ok": True, "roomId": room, "members": []}
        await asyncio.sleep(0.5)  # the removal reaches replica two through Redis
        seen = {id(tab): len(tab.events) for tab in (b1, b2)}
        await alice.wait_for("ai_message_end", wait_s=20)
        end = alice.named("ai_message_end")[0]
        assert end["finishReason"] == "stop"  # bob's cancel did not stop it
        await asyncio.sleep(0.5)
        for tab in (b1, b2):  # both of bob's tabs, on both replicas, stopped at once
            assert len(tab.events) == seen[id(tab)], tab.names()[seen[id(tab)] :]
            assert "ai_message_end" not in tab.names()
            assert any(ev == "room_event" and d["type"] == "member_removed" for ev, d in tab.events)
            refused = await _ask(tab, room, "still here?")
            assert refused["ok"] is False and refused["code"] == "FORBIDDEN"
            rejoin = await tab.call("join_room", {"roomId": room})
            assert rejoin["ok"] is False and rejoin["code"] == "FORBIDDEN"
        assert _history(two, room, token(bob)).status_code == 403


async def test_a_rooms_claim_with_a_prefix_admits_its_rooms_only(
    replicas: tuple[str, str],
) -> None:
    one, two = replicas
    owner, guest = new_id("owner"), new_id("guest")
    prefix = new_id("lobby") + ":"
    lobby, lookalike = prefix + "7", prefix.rstrip(":") + "x"
    async with connected(one, owner) as host:
        for room in (lobby, lookalike):
            assert (await host.call("join_room", {"roomId": room}))["ok"] is True
        async with with_rooms(two, guest, [prefix + "*", "bad id*", "*"]) as g:
            assert (await g.call("join_room", {"roomId": lobby}))["ok"] is True
            refused = await g.call("join_room", {"roomId": lookalike})
            assert refused["ok"] is False and refused["code"] == "FORBIDDEN"
            assert (await _ask(g, lobby, "hi from the lobby"))["ok"] is True
            await g.wait_for("message_ack", wait_s=20)
            claimed = make_token(JWT_SECRET, guest, rooms=[prefix + "*"])
            assert _history(one, lobby, claimed).status_code == 200
            assert _history(one, lookalike, claimed).status_code == 403


def _presence(client: Client, user: str) -> list[str]:
    return [
        d["type"]
        for ev, d in client.events
        if ev == "room_event" and d["userId"] == user and d["type"] in ("joined", "left")
    ]


async def test_presence_once_per_user_across_tabs_and_replicas(
    replicas: tuple[str, str],
) -> None:
    one, two = replicas
    owner, bob = new_id("owner"), new_id("bob")
    room = new_id("room")
    async with connected(one, owner) as alice:
        first = await alice.call("join_room", {"roomId": room})
        assert first["members"] == [owner]
        assert (await alice.call("add_member", {"roomId": room, "userId": bob}))["ok"] is True
        tabs = [Client(), Client(), Client()]
        for tab, url in zip(tabs, (two, one, two), strict=True):
            await tab.connect(url, auth={"token": token(bob)})
        acks = [await tab.call("join_room", {"roomId": room}) for tab in tabs]
        assert acks[-1]["members"] == sorted([owner, bob])  # online, on both replicas
        await asyncio.sleep(0.5)
        assert _presence(alice, bob) == ["joined"]  # three tabs, one "joined"
        await tabs[0].close()
        await tabs[1].call("leave_room", {"roomId": room})
        await asyncio.sleep(0.5)
        assert _presence(alice, bob) == ["joined"]  # still online in the third tab
        await tabs[2].close()
        await alice.wait_for("room_event", 3)  # member_added, bob joined, bob left
        await asyncio.sleep(0.3)
        assert _presence(alice, bob) == ["joined", "left"]
        again = await alice.call("join_room", {"roomId": room})
        assert again["members"] == [owner]
        await tabs[1].close()


async def test_person_messages_reach_the_room_once_and_are_stored_in_order(
    replicas: tuple[str, str],
) -> None:
    one, two = replicas
    owner, bob = new_id("owner"), new_id("bob")
    room = new_id("room")
    async with connected(one, owner) as alice, connected(two, bob) as b:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        assert (await alice.call("add_member", {"roomId": room, "userId": bob}))["ok"] is True
        assert (await b.call("join_room", {"roomId": room}))["ok"] is True
        rid = new_id("post")
        payload = {"roomId": room, "content": "hi alice, ask it about cats", "requestId": rid}
        posted = await b.call("post_message", payload)
        assert posted["ok"] is True and posted["requestId"] == rid
        again = await b.call("post_message", payload)  # the same requestId: stored once
        assert again["messageId"] == posted["messageId"]
        (seen,) = (await alice.wait_for("new_message"))[:1]
        assert seen["message"]["userId"] == bob and seen["message"]["role"] == "user"
        assert seen["message"]["id"] == posted["messageId"]
        ack = await _ask(alice, room, "what did bob say")
        assert ack["ok"] is True
        await alice.wait_for("message_ack", wait_s=20)
        empty = await b.call("post_message", {"roomId": room, "content": "   "})
        assert empty["ok"] is False and empty["code"] == "EMPTY_MESSAGE"
        async with connected(two, new_id("eve")) as e:
            refused = await e.call("post_message", {"roomId": room, "content": "hello?"})
            assert refused["ok"] is False and refused["code"] == "FORBIDDEN"
    history = _history(one, room, token(owner)).json()["messages"]
    assert [(m["role"], m["userId"]) for m in history] == [
        ("user", bob), ("user", owner), ("assistant", None),
    ]  # fmt: skip


def _room_view(client: Client) -> list[tuple[Any, ...]]:
    """What a socket saw of the room's messages and answers, in arrival order."""
    seen: list[tuple[Any, ...]] = []
    for ev, d in client.events:
        if ev == "new_message":
            m = d["message"]
            seen.append((ev, m["id"], m["userId"], m["content"]))
        elif ev.startswith("ai_message_"):
            seen.append((ev, d["requestId"], d.get("seq"), d.get("chunk"), d.get("content")))
    return seen


async def test_three_users_on_two_replicas_see_the_same_room(replicas: tuple[str, str]) -> None:
    """Each asks the AI in turn and posts once; every socket sees the same sequence of
    new_message / ai_message_* events, and each other user's presence once."""
    one, two = replicas
    users = [new_id("ann"), new_id("ben"), new_id("cat")]
    room = new_id("room")
    urls = (one, two, one)
    clients = [Client() for _ in users]
    try:
        for client, user, url in zip(clients, users, urls, strict=True):
            await client.connect(url, auth={"token": make_token(JWT_SECRET, user, rooms=[room])})
            assert (await client.call("join_room", {"roomId": room}))["ok"] is True
        await asyncio.sleep(0.3)
        for client, user in zip(clients, users, strict=True):
            posted = await client.call(
                "post_message", {"roomId": room, "content": f"{user} says hi"}
            )
            assert posted["ok"] is True
            assert (await _ask(client, room, f"question from {user}"))["ok"] is True
            await client.wait_for("message_ack", wait_s=20)
        for client in clients:
            await client.wait_for("ai_message_end", 3)
        await asyncio.sleep(0.3)
        views = [_room_view(c) for c in clients]
        assert views[0] == views[1] == views[2]
        assert [v[0] for v in views[0]].count("ai_message_end") == 3
        assert [v[0] for v in views[0]].count("new_message") == 6
        # presence: each socket is told once of every user who joined after it
        for i, client in enumerate(clients):
            for j, user in enumerate(users):
                assert _presence(client, user) == (["joined"] if j > i else []), (i, j)
    finally:
        for client in clients:
            await client.close()


async def test_a_removed_member_replayed_by_a_follower_stops_receiving(
    replicas: tuple[str, str],
) -> None:
    """Bob joins mid-answer on the other replica: he is replayed the generation from the backend
    and followed live (bridge/sinks.py ``follow``); removed, that follower stops at once too."""
    one, two = replicas
    owner, bob = new_id("owner"), new_id("bob")
    room = new_id("room")
    async with connected(one, owner) as alice, connected(two, bob) as b:
        assert (await alice.call("join_room", {"roomId": room}))["ok"] is True
        assert (await alice.call("add_member", {"roomId": room, "userId": bob}))["ok"] is True
        ack = await _ask(alice, room, "[[tps=10]] [[tokens=40]] slow and long")
        assert ack["ok"] is True
        await alice.wait_for("ai_message_chunk", 3)
        joined = await b.call("join_room", {"roomId": room})
        assert joined["ok"] is True and joined["inFlight"] == [ack["requestId"]]
        await b.wait_for("ai_message_chunk", 5)  # replayed, then live
        removed = await alice.call("remove_member", {"roomId": room, "userId": bob})
        assert removed["ok"] is True
        await asyncio.sleep(0.5)
        seen = len(b.events)
        await alice.wait_for("ai_message_end", wait_s=20)
        await asyncio.sleep(0.5)
        assert b.names()[seen:] == [], b.names()[seen:]
        assert "ai_message_end" not in b.names()
