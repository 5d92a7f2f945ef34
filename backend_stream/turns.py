"""Where a generation waiting for its room sleeps until its turn may have come.

The room's lock lives in Redis (store.py, scripts.ROOM_LIB); a holder that releases it with
generations waiting publishes the room id on ``bs:turn``, and the registry's listener calls
``wake``. A waiter takes its room's ``Signal`` *before* it asks Redis for its turn, so a wake
that lands during that round trip is not lost; it still polls (``wait``'s timeout: at most
``MAX_POLL_S``, or exactly until the holder's lock expires) because a holder that died releases
nothing and a published message can be missed while the listener reconnects. One entry per
room with waiters here, dropped with its last waiter: nothing grows past the waiting set.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_POLL_S = 0.5
LOCK_EXPIRY_MARGIN_S = 0.005


@dataclass(eq=False)
class Signal:
    """One room's wake-up, shared by this process's waiters for that room."""

    waiters: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)


class RoomTurns:
    def __init__(self) -> None:
        self._rooms: dict[str, Signal] = {}

    @contextlib.contextmanager
    def waiting(self, room_id: str) -> Iterator[None]:
        """This process waits for ``room_id`` while the block runs."""
        signal = self._rooms.get(room_id)
        if signal is None:
            signal = self._rooms[room_id] = Signal()
        signal.waiters += 1
        try:
            yield
        finally:
            signal.waiters -= 1
            if signal.waiters == 0 and self._rooms.get(room_id) is signal:
                del self._rooms[room_id]

    def armed(self, room_id: str) -> asyncio.Event:
        """The event the next ``wake`` of ``room_id`` sets; take it before asking Redis."""
        signal = self._rooms[room_id]
        if signal.event.is_set():
            signal.event = asyncio.Event()
        return signal.event

    def wake(self, room_id: str) -> None:
        signal = self._rooms.get(room_id)
        if signal is not None:
            signal.event.set()

    @staticmethod
    async def wait(event: asyncio.Event, lock_ttl_ms: int) -> None:
        """Until ``event`` is set, the holder's lock expires, or the poll interval passes."""
        timeout_s = MAX_POLL_S
        if lock_ttl_ms >= 0:
            timeout_s = min(timeout_s, lock_ttl_ms / 1000 + LOCK_EXPIRY_MARGIN_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()
