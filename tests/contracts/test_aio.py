"""``cancel_and_wait``: a shutdown that really ends tasks, even ones that swallow a cancel."""

from __future__ import annotations

import asyncio

from contracts.aio import cancel_and_wait


async def test_a_task_that_swallows_its_first_cancel_is_cancelled_again_and_ends() -> None:
    """Regression (issue 7): redis-py sometimes swallows the CancelledError that lands inside a
    command; the bridge cancelled its flag poller once, then waited for it forever."""
    swallowed = asyncio.Event()

    async def poller() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed.is_set():
                    raise
                swallowed.set()  # what redis-py did: the loop goes on

    task = asyncio.create_task(poller())
    await asyncio.sleep(0)
    left = await asyncio.wait_for(cancel_and_wait([task], 2.0), 3.0)
    assert swallowed.is_set()
    assert left == set() and task.cancelled()


async def test_a_task_that_never_ends_is_returned_at_the_deadline() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    left = await cancel_and_wait([task], 0.3)
    assert left == {task}
    assert loop.time() - started < 2.0
    release.set()
    await cancel_and_wait([task], 1.0)
    assert task.done()


async def test_failed_and_finished_tasks_are_collected_without_raising() -> None:
    async def boom() -> None:
        raise RuntimeError("x")

    failed = asyncio.create_task(boom())
    finished = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    assert await cancel_and_wait([failed, finished], 1.0) == set()
