"""The open-loop driver: sends each request at its scheduled time, whatever the target is doing.

One dispatcher coroutine walks the precomputed schedule; a request goes out on a free user's
connection at once, or waits in a FIFO for one (the concurrency cap). Both delays are recorded per
request: ``dispatch_lag_ms`` is the generator's own lateness (its event loop was busy), and
``slot_wait_ms`` is time spent waiting for a free connection. All latencies still count from the
scheduled time, so neither delay can hide slowness of the system under test.

A single watchdog task enforces every request's limits (ack, TTFT, stall, total, done) a few times a
second, instead of a timer per request, and a monitor samples this process's CPU once a second.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from loadtest.record import RequestRecord, RequestTracker, Timeouts
from loadtest.schedule import Arrival
from loadtest.tokens import User

__all__ = [
    "ConnectStats",
    "Progress",
    "RunSettings",
    "Runner",
    "Target",
    "TargetHooks",
    "TargetRun",
]


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How one target is driven; the schedule and the users come separately."""

    max_in_flight: int
    timeouts: Timeouts = field(default_factory=Timeouts)
    start_delay_s: float = 0.5
    watchdog_interval_s: float = 0.1
    monitor_interval_s: float = 1.0
    drain_grace_s: float = 5.0


@dataclass(slots=True)
class ConnectStats:
    """How the target's connections fared (Socket.IO only; the direct target has none)."""

    connect_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    disconnects: int = 0
    reconnects: int = 0
    late_events: int = 0  # events for a request that had already finished or was unknown


@dataclass(slots=True)
class TargetRun:
    """Everything a summary of one target needs besides the run's settings."""

    target: str
    records: list[RequestRecord]
    connect: ConnectStats
    cpu: list[tuple[float, float, float]]  # (t_s, this process %, whole machine %)
    cpu_process_s: float
    duration_s: float


@dataclass(frozen=True, slots=True)
class Progress:
    elapsed_s: float
    scheduled: int
    sent: int
    in_flight: int
    waiting: int
    finished: int
    failed: int
    recent_ttft_p95_ms: float | None
    recent_lag_max_ms: float | None
    cpu_pct: float


class TargetHooks(Protocol):
    def user_ready(self, user: int) -> None: ...
    def user_lost(self, user: int, now: float) -> None: ...


class Target(Protocol):
    """A system under test: the bridge over Socket.IO, or the backend's SSE directly."""

    name: str
    connect: ConnectStats

    async def open(self, users: Sequence[User], hooks: TargetHooks) -> None: ...
    async def start(self, tracker: RequestTracker, user: User) -> None: ...
    def forget(self, request_id: str) -> None: ...
    def tick(self, now: float) -> None: ...
    async def close(self) -> None: ...


class Runner:
    """Drives one target through one schedule; ``await run()`` returns its ``TargetRun``."""

    def __init__(
        self,
        target: Target,
        schedule: Sequence[Arrival],
        users: Sequence[User],
        settings: RunSettings,
        *,
        run_id: str,
        progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.target = target
        self.schedule = schedule
        self.users = users
        self.settings = settings
        self.run_id = run_id
        self.progress = progress
        self.records: list[RequestRecord] = []
        self._free: deque[int] = deque()
        self._down: set[int] = set(range(len(users)))
        self._waiting: deque[RequestTracker] = deque()
        self._by_user: dict[int, RequestTracker] = {}
        self._in_flight: dict[str, RequestTracker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled = 0
        self._sent = 0
        self._failed = 0
        self._t0 = 0.0
        self._cpu: list[tuple[float, float, float]] = []
        self._dispatch_done = False
        self._idle = asyncio.Event()

    # ---- hooks the target calls -----------------------------------------------------------

    def user_ready(self, user: int) -> None:
        self._down.discard(user)
        if user not in self._by_user:
            self._free.append(user)
            self._pump(time.perf_counter())

    def user_lost(self, user: int, now: float) -> None:
        self._down.add(user)
        try:
            self._free.remove(user)
        except ValueError:
            pass
        tracker = self._by_user.get(user)
        if tracker is not None:
            tracker.on_disconnect(now)

    # ---- the run --------------------------------------------------------------------------

    async def run(self) -> TargetRun:
        process = psutil.Process()
        await self.target.open(self.users, self)
        cpu_start = process.cpu_times()
        process.cpu_percent(None)
        psutil.cpu_percent(None)
        self._t0 = time.perf_counter() + self.settings.start_delay_s
        helpers = [
            asyncio.create_task(self._watchdog(), name="loadtest-watchdog"),
            asyncio.create_task(self._monitor(process), name="loadtest-monitor"),
        ]
        try:
            await self._dispatch()
            await self._drain()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            duration_s = time.perf_counter() - self._t0
            cpu_end = process.cpu_times()
            await self.target.close()
            await self._cancel_tasks()
        cpu_s = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
        self.records.sort(key=lambda r: r.index)
        return TargetRun(
            target=self.target.name,
            records=self.records,
            connect=self.target.connect,
            cpu=self._cpu,
            cpu_process_s=cpu_s,
            duration_s=duration_s,
        )

    async def _dispatch(self) -> None:
        for arrival in self.schedule:
            due = self._t0 + arrival.offset_s
            delay = due - time.perf_counter()
            await asyncio.sleep(max(delay, 0.0))  # sleep(0) still lets the loop breathe
            now = time.perf_counter()
            tracker = self._new_tracker(arrival, due)
            tracker.record.dispatch_lag_ms = max(now - due, 0.0) * 1000.0
            self._scheduled += 1
            self._waiting.append(tracker)
            self._pump(now)

    def _new_tracker(self, arrival: Arrival, due: float) -> RequestTracker:
        record = RequestRecord(
            target=self.target.name,
            index=arrival.index,
            request_id=f"lt-{self.run_id}-{self.target.name[0]}{arrival.index}",
            user=-1,
            stage=arrival.stage,
            steady=arrival.steady,
            scheduled_s=arrival.offset_s,
        )
        tracker = RequestTracker(record, due, self.settings.timeouts)
        tracker.on_finished = self._on_finished
        return tracker

    def _pump(self, now: float) -> None:
        while self._waiting and self._free and len(self._in_flight) < self.settings.max_in_flight:
            tracker = self._waiting.popleft()
            user = self._free.popleft()
            record = tracker.record
            record.user = user
            waited_ms = (now - tracker.scheduled_at) * 1000.0 - (record.dispatch_lag_ms or 0.0)
            record.slot_wait_ms = max(waited_ms, 0.0)
            self._in_flight[record.request_id] = tracker
            self._by_user[user] = tracker
            self._sent += 1
            task = asyncio.create_task(self.target.start(tracker, self.users[user]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _on_finished(self, tracker: RequestTracker) -> None:
        record = tracker.record
        self.records.append(record)
        if not record.ok:
            self._failed += 1
        if self._in_flight.pop(record.request_id, None) is None:
            self._check_idle()
            return  # never sent
        self.target.forget(record.request_id)
        self._by_user.pop(record.user, None)
        if record.user not in self._down:
            self._free.append(record.user)
        self._pump(time.perf_counter())
        self._check_idle()

    def _check_idle(self) -> None:
        if self._dispatch_done and not self._in_flight and not self._waiting:
            self._idle.set()

    async def _watchdog(self) -> None:
        limit_s = self.settings.timeouts.total_s
        while True:
            await asyncio.sleep(self.settings.watchdog_interval_s)
            now = time.perf_counter()
            for tracker in list(self._in_flight.values()):
                tracker.check_deadlines(now)
            while self._waiting and now - self._waiting[0].scheduled_at > limit_s:
                self._waiting.popleft().fail_unsent()
            self.target.tick(now)

    async def _drain(self) -> None:
        limits = self.settings.timeouts
        budget_s = limits.total_s + limits.done_s + self.settings.drain_grace_s
        self._dispatch_done = True
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), budget_s)
        except TimeoutError:
            pass
        for tracker in [*self._waiting, *self._in_flight.values()]:
            if tracker.record.user < 0:
                tracker.fail_unsent()
            else:
                tracker.abandon()
        self._waiting.clear()

    async def _monitor(self, process: psutil.Process) -> None:
        while True:
            await asyncio.sleep(self.settings.monitor_interval_s)
            now = time.perf_counter()
            sample = (now - self._t0, process.cpu_percent(None), psutil.cpu_percent(None))
            self._cpu.append(sample)
            if self.progress is not None:
                self.progress(self._snapshot(now, sample[1]))

    def _snapshot(self, now: float, cpu_pct: float) -> Progress:
        recent = [r for r in self.records[-2000:] if r.scheduled_s >= now - self._t0 - 10.0]
        ttfts = sorted(r.ttft_ms if r.ttft_ms is not None else float("inf") for r in recent)
        lags = [r.dispatch_lag_ms for r in recent if r.dispatch_lag_ms is not None]
        return Progress(
            elapsed_s=now - self._t0,
            scheduled=self._scheduled,
            sent=self._sent,
            in_flight=len(self._in_flight),
            waiting=len(self._waiting),
            finished=len(self.records),
            failed=self._failed,
            recent_ttft_p95_ms=ttfts[int(0.95 * (len(ttfts) - 1))] if ttfts else None,
            recent_lag_max_ms=max(lags) if lags else None,
            cpu_pct=cpu_pct,
        )

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
