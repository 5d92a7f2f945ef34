"""Async plumbing both services use: stopping background tasks for good, and awaiting redis-py.

It lives in ``contracts`` because that is the one package both services may import (like
``contracts.redis_server``); it is process plumbing, not wire format.

Why not ``task.cancel(); await task``: on CPython 3.11 ``asyncio.wait_for`` returns the inner
result instead of raising when a cancel arrives in the same loop step as that result (fixed in
3.12, where ``wait_for`` is built on ``asyncio.timeout``). redis-py reads replies through
``wait_for`` whenever a socket timeout is set, so a loop that issues Redis commands loses a
cancel now and then (measured: about a third of cancels aimed at a busy ``HGETALL`` loop) and
goes on as if nothing happened. A shutdown that cancels once and then waits without a bound waits
forever: with uvicorn 0.55's shutdown timing this hung the bridge's exit in many runs (issue 7).
So cancel again until the task has really ended, within a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, cast

RECANCEL_INTERVAL_S = 0.05


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout_s: float) -> set[Any]:
    """Cancel ``tasks`` (again and again) until each has ended or ``timeout_s`` has passed.

    Returns the tasks still running at the deadline (empty on a clean stop). Never raises for
    what the tasks raise; a cancellation of the caller itself still propagates.
    """
    pending: set[asyncio.Task[Any]] = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        done, pending = await asyncio.wait(pending, timeout=min(RECANCEL_INTERVAL_S, remaining))
        for task in done:  # retrieved, so asyncio does not log "exception was never retrieved"
            if not task.cancelled():
                task.exception()
    return set(pending)


async def awaited(value: Any) -> Any:
    """Await a redis-py command: its stubs type many as ``Awaitable[T] | T`` (the sync and the
    async client share them); on the asyncio client they always await."""
    return await cast(Awaitable[Any], value)
