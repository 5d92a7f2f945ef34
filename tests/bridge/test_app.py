"""The bridge process: start, serve, and stop on request."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.flags import FlagStore
from bridge.settings import FlagDefaults
from tests.bridge.fake_backend import TOKEN, FakeBackend
from tests.bridge.harness import running_bridge


async def test_bridge_exits_on_request_when_a_redis_call_swallows_the_cancel(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 7): under uvicorn 0.55 the bridge often never returned from ``serve``
    after ``request_exit``. CPython 3.11's ``asyncio.wait_for`` (redis-py reads with it when a
    socket timeout is set) returns the result instead of raising when a cancel arrives in the
    same loop step as the reply, so the flag poller lived on and ``stop`` waited for it without a
    bound. Here the poller's Redis call loses the first cancel the same way, every time."""
    swallowed = asyncio.Event()
    real_load = FlagStore.load

    async def load_losing_a_cancel(self: FlagStore) -> FlagDefaults:
        flags = await real_load(self)
        if not swallowed.is_set():
            try:
                await asyncio.sleep(3600)  # "in flight" until the stop's cancel arrives
            except asyncio.CancelledError:
                swallowed.set()  # ... and returned as if the reply had won the race
        return flags

    async with FakeBackend() as fake:
        async with running_bridge(redis_url, fake.url, TOKEN, exit_timeout_s=10) as running:
            monkeypatch.setattr(FlagStore, "load", load_losing_a_cancel)
            await asyncio.sleep(0.5)  # the poller is now inside load()
            exit_at = time.monotonic()
        assert swallowed.is_set()
        assert time.monotonic() - exit_at < 8.0
        assert running.bridge.server.tasks == set()
