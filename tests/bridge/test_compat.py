"""The python-socketio / python-engineio internals the bridge relies on (bridge/compat.py).

None of them is API. These tests fail when an upgrade renames one, changes a signature the
overrides were written against, or reshapes an attribute the bridge reads, so the upper bounds
in pyproject.toml can be raised on evidence instead of hope.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator

import pytest
import socketio

from bridge import compat
from tests.bridge.fake_backend import TOKEN, FakeBackend
from tests.bridge.harness import RunningBridge, connected, new_id, running_bridge


def _defined_in_library(cls: type, name: str) -> object:
    for klass in cls.__mro__:
        if name in vars(klass):
            return vars(klass)[name]
    raise AssertionError(f"{cls.__name__}.{name} no longer exists")


@pytest.mark.parametrize(
    ("cls", "name", "params"),
    compat.OVERRIDDEN,
    ids=[f"{c.__name__}.{n}" for c, n, _ in compat.OVERRIDDEN],
)
def test_overridden_internals_keep_their_names_and_signatures(
    cls: type, name: str, params: tuple[str, ...]
) -> None:
    method = _defined_in_library(cls, name)
    ours = compat.Server if issubclass(compat.Server, cls) else compat.Manager
    kind = (
        inspect.isasyncgenfunction
        if name in vars(ours) and inspect.isasyncgenfunction(vars(ours)[name])
        else inspect.iscoroutinefunction
    )
    assert kind(method), f"{name} is no longer a {kind.__name__[2:]}"
    assert tuple(inspect.signature(method).parameters) == params  # type: ignore[arg-type]


def test_the_bridge_subclasses_override_exactly_what_is_checked() -> None:
    checked = {(cls, name) for cls, name, _ in compat.OVERRIDDEN}
    for ours, base in (
        (compat.Server, socketio.AsyncServer),
        (compat.Manager, socketio.AsyncRedisManager),
    ):
        overridden = {n for n in vars(ours) if n.startswith("_") and not n.startswith("__")}
        assert {(base, n) for n in overridden} <= checked, overridden


def test_message_packet_encodes_as_an_engineio_v4_message() -> None:
    pkt = compat.message_packet('2["e",{}]')
    assert pkt.encode() == '42["e",{}]'


@pytest.fixture
async def bridge(redis_url: str) -> AsyncIterator[RunningBridge]:
    async with FakeBackend() as fake, running_bridge(redis_url, fake.url, TOKEN) as running:
        yield running


async def test_reached_attributes_have_the_shape_the_bridge_reads(
    bridge: RunningBridge, redis_url: str
) -> None:
    server = bridge.bridge.server
    manager, sio = server._manager, server._sio
    room = new_id("room")
    async with connected(bridge.url, new_id("user")) as client:
        ack = await client.call("join_room", {"roomId": room})
        assert ack["ok"] is True
        assert manager.connected_sockets() == 1
        members = manager.members(room)
        assert len(members) == 1
        ((sid, eio_sid),) = members.items()
        assert manager.eio_sid_from_sid(sid, compat.NAMESPACE) == eio_sid
        assert manager.sid_from_eio_sid(eio_sid, compat.NAMESPACE) == sid
        assert room in manager.local_rooms() and sid not in manager.local_rooms()
        assert isinstance(manager.host_id, str) and manager.host_id
        assert isinstance(manager.listener(), asyncio.Task)
        assert manager.redis_client() is not None
        # what the listener override calls: a sync connect that sets ``pubsub``, the channel
        assert tuple(inspect.signature(manager._redis_connect).parameters) == ()
        assert not inspect.iscoroutinefunction(manager._redis_connect)
        assert manager.pubsub is not None and isinstance(manager.channel, str)
        sock = compat.eio_socket(sio, eio_sid)
        assert sock is not None
        assert isinstance(compat.output_queue(sock), asyncio.Queue)
        close_params = inspect.signature(sock.close).parameters
        assert {"wait", "abort"} <= set(close_params)
        # the bridge assigns these on the live manager; any other name we define must be one
        # the library never sets (on a fresh instance or on this running one)
        assigned = {"on_remote_emit", "on_resubscribed", "subscribed"}
        fresh = compat.Manager(redis_url)
        for ours, obj, own in (
            (compat.Manager, fresh, set()),
            (compat.Manager, manager, assigned),
            (compat.Server, sio, set()),
        ):
            added = {n for n in vars(ours) if not n.startswith("__")}
            clash = added & (set(vars(obj)) - own)
            assert not clash, f"the library now sets an attribute we define: {clash}"
        await compat.abort(sio, eio_sid)  # what a kick does after disconnecting the sid
        assert compat.eio_socket(sio, eio_sid) is None
