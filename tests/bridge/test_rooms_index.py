"""The bridge's own index of a socket's rooms (``SocketServer._rooms_of``, issue 8) never
disagrees with python-socketio's rooms, and is gone with the socket.

Membership is asked on every send; python-socketio's ``rooms(sid)`` scans every room of the
replica, so the bridge keeps its own index: these tests hold it to python-socketio's answer
after every join, leave and disconnect, on a real bridge.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bridge.sio import SocketServer
from tests.bridge.fake_backend import TOKEN, FakeBackend
from tests.bridge.harness import RunningBridge, connected, new_id, running_bridge


@pytest.fixture
async def bridge(redis_url: str) -> AsyncIterator[RunningBridge]:
    async with FakeBackend() as fake, running_bridge(redis_url, fake.url, TOKEN) as running:
        yield running


def _truth(server: SocketServer, sid: str) -> set[str]:
    """python-socketio's rooms of ``sid``, without the socket's own room."""
    rooms = server._sio.rooms(sid)  # the O(rooms) scan the index replaces
    return set(rooms) - {sid}


def _agrees(server: SocketServer, sid: str, rooms: list[str]) -> None:
    truth = _truth(server, sid)
    assert set(server.rooms_of(sid)) == truth
    for room in rooms:
        assert server.in_room(sid, room) is (room in truth)


async def test_the_index_follows_joins_and_leaves(bridge: RunningBridge) -> None:
    server = bridge.bridge.server
    user = new_id("user")
    rooms = [new_id("room") for _ in range(3)]
    async with connected(bridge.url, user) as client, connected(bridge.url, user) as other:
        sid, other_sid = client.sio.get_sid(), other.sio.get_sid()
        assert sid is not None and other_sid is not None
        for room in rooms:
            assert (await client.call("join_room", {"roomId": room}))["ok"] is True
            _agrees(server, sid, rooms)
        assert (await other.call("join_room", {"roomId": rooms[0]}))["ok"] is True
        assert set(server.rooms_of(sid)) == set(rooms)
        assert (await client.call("leave_room", {"roomId": rooms[1]}))["ok"] is True
        _agrees(server, sid, rooms)
        assert not server.in_room(sid, rooms[1])
        # leaving a room one is not in changes nothing
        assert (await client.call("leave_room", {"roomId": new_id("room")}))["ok"] is True
        _agrees(server, sid, rooms)
        _agrees(server, other_sid, rooms)
        assert server.rooms_of(other_sid) == [rooms[0]]
    # both sockets gone: nothing of them is left in the index
    for _ in range(100):
        if sid not in server._rooms_of and other_sid not in server._rooms_of:
            break
        await asyncio.sleep(0.02)
    assert sid not in server._rooms_of and other_sid not in server._rooms_of
    assert not server.in_room(sid, rooms[0])
