from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from loadtest.sio_client import ConnectRefused, SioConnection, websocket_url
from loadtest.tokens import mint_token
from tests.loadtest.fakes import SECRET, FakeBridge, Script, serving


@pytest.fixture
async def bridge() -> AsyncIterator[FakeBridge]:
    fake = FakeBridge(Script(ttft_s=0.01, gap_s=0.0), ping_interval_s=0.2)
    async with serving(fake.app, fake.port):
        yield fake
    for task in fake.tasks:
        task.cancel()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def test_websocket_url_maps_scheme_and_path() -> None:
    assert websocket_url("http://h:1") == "ws://h:1/socket.io/?EIO=4&transport=websocket"
    assert websocket_url("https://h/", "/x/sio") == "wss://h/x/sio/?EIO=4&transport=websocket"


async def test_emit_with_ack_and_events_reach_their_callbacks(
    bridge: FakeBridge, session: aiohttp.ClientSession
) -> None:
    events: list[tuple[str, Any]] = []
    acks: list[Any] = []
    done = asyncio.Event()

    def on_event(name: str, data: Any, now: float) -> None:
        events.append((name, data))
        if name == "message_ack":
            done.set()

    conn = SioConnection(on_event, lambda c, t: None)
    await conn.connect(session, websocket_url(bridge.url), {"token": mint_token(SECRET, "u1")}, 5)
    await conn.emit(
        "send_message",
        {"roomId": "r1", "content": "hi", "requestId": "q1"},
        lambda data, now: acks.append(data),
    )
    await asyncio.wait_for(done.wait(), 5)
    assert acks[0]["ok"] is True and acks[0]["requestId"] == "q1"
    names = [name for name, _ in events]
    assert names[0] == "ai_message_start" and names[-2:] == ["ai_message_end", "message_ack"]
    assert [d["seq"] for n, d in events if n == "ai_message_chunk"] == [0, 1, 2, 3]
    await conn.close()


async def test_answers_server_pings_so_the_connection_outlives_the_ping_timeout(
    bridge: FakeBridge, session: aiohttp.ClientSession
) -> None:
    closed: list[float] = []
    conn = SioConnection(lambda *a: None, lambda c, t: closed.append(t))
    await conn.connect(session, websocket_url(bridge.url), {"token": mint_token(SECRET, "u")}, 5)
    assert conn.ping_deadline_s == 1.0  # the floor: the fake's interval + timeout is smaller
    await asyncio.sleep(1.5)  # several ping intervals + timeouts
    assert not closed and not conn.closed
    await conn.close()
    assert closed and conn.closed


async def test_refused_connection_raises_with_the_contract_code(
    bridge: FakeBridge, session: aiohttp.ClientSession
) -> None:
    conn = SioConnection(lambda *a: None, lambda c, t: None)
    with pytest.raises(ConnectRefused) as caught:
        await conn.connect(session, websocket_url(bridge.url), {"token": "nope"}, 5)
    assert caught.value.code == "UNAUTHORIZED"


async def test_server_side_disconnect_calls_on_close(
    bridge: FakeBridge, session: aiohttp.ClientSession
) -> None:
    closed: list[SioConnection] = []
    gone = asyncio.Event()

    def on_close(c: SioConnection, now: float) -> None:
        closed.append(c)
        gone.set()

    conn = SioConnection(lambda *a: None, on_close)
    await conn.connect(session, websocket_url(bridge.url), {"token": mint_token(SECRET, "u")}, 5)
    assert conn.sid is not None
    sids = list(bridge.sio.manager.get_participants("/", None))
    await bridge.sio.disconnect(sids[0][0])
    await asyncio.wait_for(gone.wait(), 5)
    assert closed == [conn] and conn.closed
