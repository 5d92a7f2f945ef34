"""Run the bridge with an event-loop lag and GC pause recorder (a benchmark aid, issue 8).

    BRIDGE_CMD="python -m bridge.probe --host 127.0.0.1 --port {port}" \\
      PROBE_OUT=/tmp/probe.txt bash ../shared/peers/bench/vs_peer.sh

Same arguments and environment as ``python -m bridge``. Every ``PROBE_EVERY`` samples (a 5 ms
sleep each) it appends one line to ``PROBE_OUT`` (default: stderr): the loop's lag percentiles
over the last ``PROBE_WINDOW`` samples (how late the 5 ms sleep woke), how many exceeded 50 ms,
and the cyclic GC's collections, total and longest pause per generation since start. It tells a
tail that comes from the loop being blocked (lag, GC) from one that queues elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import sys
import time
from collections.abc import Coroutine
from typing import Any, TextIO

import bridge.__main__ as entry

SLEEP_S = 0.005
SLOW_MS = 50.0


class GcPauses:
    """Collections, total and longest pause (ms) per generation, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.stats = {gen: [0, 0.0, 0.0] for gen in range(3)}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - self._started) * 1000.0
        stat = self.stats[int(info["generation"])]
        stat[0] += 1
        stat[1] += pause_ms
        stat[2] = max(stat[2], pause_ms)

    def line(self) -> str:
        return " ".join(
            f"g{gen}:{int(n)}/{total:.0f}ms/max{longest:.0f}"
            for gen, (n, total, longest) in self.stats.items()
        )


async def record(out: TextIO, pauses: GcPauses, every: int, window: int) -> None:
    loop = asyncio.get_running_loop()
    lags: collections.deque[float] = collections.deque(maxlen=window)
    count = 0
    while True:
        before = loop.time()
        await asyncio.sleep(SLEEP_S)
        lags.append((loop.time() - before - SLEEP_S) * 1000.0)
        count += 1
        if count % every:
            continue
        ordered = sorted(lags)
        n = len(ordered)
        slow = sum(1 for lag in ordered if lag > SLOW_MS)
        print(
            f"{time.strftime('%H:%M:%S')} lag ms p50 {ordered[n // 2]:.1f} "
            f"p95 {ordered[int(n * 0.95)]:.1f} p99 {ordered[int(n * 0.99)]:.1f} "
            f"max {ordered[-1]:.1f} >{SLOW_MS:.0f}ms {slow} | gc {pauses.line()}",
            file=out,
            flush=True,
        )


def main() -> int:
    path = os.environ.get("PROBE_OUT")
    out = open(path, "a", encoding="utf-8") if path else sys.stderr
    every = int(os.environ.get("PROBE_EVERY", "400"))
    window = int(os.environ.get("PROBE_WINDOW", "4000"))
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    run = entry._run

    def probed(coro: object) -> None:
        async def both() -> None:
            recorder = asyncio.ensure_future(record(out, pauses, every, window))
            try:
                await _awaitable(coro)
            finally:
                recorder.cancel()

        run(both())

    entry._run = probed
    try:
        return entry.main()
    finally:
        if out is not sys.stderr:
            out.close()


def _awaitable(coro: object) -> Coroutine[Any, Any, Any]:
    assert asyncio.iscoroutine(coro)
    return coro


if __name__ == "__main__":
    sys.exit(main())
