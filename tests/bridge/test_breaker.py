"""The per-replica breaker (CONTRACT.md section 5) as a state machine on an injected clock, and
its snapshots in a real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from bridge.breaker import (
    BREAKERS_KEY,
    CLOSED,
    HALF_OPEN,
    OPEN,
    STREAM,
    Breaker,
    read_breakers,
    verdict,
    write_breaker,
)
from bridge.settings import BreakerSettings, Settings, SettingsError
from contracts import ErrorCode


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


WALL = 1.7e9  # the wall clock is the test clock shifted to epoch seconds


class Watched(Breaker):
    """A breaker on the test clock that notes every state it changes to."""

    def __init__(self, clock: Clock, **kwargs: Any) -> None:
        self.changes: list[str] = []
        super().__init__(
            "r1", clock=clock, wall_clock=lambda: WALL + clock.now, on_change=self._note, **kwargs
        )

    def _note(self) -> None:
        self.changes.append(self.state)


def breaker(clock: Clock, **kwargs: Any) -> Watched:
    return Watched(clock, **kwargs)


def run(b: Breaker, good: int = 0, bad: int = 0) -> None:
    """``bad`` failed requests, then ``good`` ones, each through allow_stream and record."""
    for ok in [False] * bad + [True] * good:
        ticket = b.allow_stream()
        assert ticket == STREAM
        b.record(ticket, good=ok)


def trip(b: Breaker, clock: Clock) -> None:
    run(b, good=10, bad=10)
    assert b.state == OPEN


# ---- opening ---------------------------------------------------------------------------------


def test_opens_when_more_than_a_fifth_of_at_least_twenty_fail() -> None:
    clock = Clock()
    b = breaker(clock)
    run(b, good=16, bad=4)  # exactly 20 %: not more than
    assert b.state == CLOSED and b.allow_stream() == STREAM
    run(b, bad=1)  # 5 of 21
    assert b.state == OPEN
    assert b.allow_stream() is None
    assert b.open_value() == 1.0
    assert b.changes == [OPEN]


def test_exactly_twenty_percent_never_opens() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(8):  # every fifth one fails: at most 20 % at every count, 20 % at 20 and 40
        run(b, good=4)
        run(b, bad=1)
    assert b.state == CLOSED
    snap = b.snapshot()
    assert (snap["total"], snap["bad"]) == (40, 8)


def test_not_below_the_minimum_however_bad() -> None:
    clock = Clock()
    b = breaker(clock)
    run(b, bad=19)
    assert b.state == CLOSED and b.open_value() == 0.0
    run(b, bad=1)
    assert b.state == OPEN


def test_a_good_request_can_complete_the_minimum_of_a_bad_window() -> None:
    b = breaker(Clock())
    run(b, bad=5, good=14)  # 19 requests
    assert b.state == CLOSED
    run(b, good=1)  # 5 of 20 = 25 %
    assert b.state == OPEN


def test_the_window_slides_old_failures_out() -> None:
    clock = Clock(1000.2)
    b = breaker(clock)
    run(b, bad=10)
    clock.now = 1015.0
    run(b, bad=2)
    clock.now = 1030.5  # the second 1000 has left the 30 s window; 1015 has not
    assert (b.snapshot()["total"], b.snapshot()["bad"]) == (2, 2)
    run(b, good=18)  # 2 of 20 bad: the 10 of 1000 would have made it 12 of 30
    assert b.state == CLOSED
    clock.now = 1046.0  # 1015 gone too
    assert b.snapshot()["total"] == 18
    clock.now = 1e6  # a long idle gap empties it (and does not loop over the gap)
    assert (b.snapshot()["total"], b.snapshot()["bad"]) == (0, 0)


def test_the_window_counts_the_last_window_s_seconds_only() -> None:
    clock = Clock(2000.0)
    b = breaker(clock, window_s=10, min_requests=4, failure_ratio=0.5)
    for second in range(12):  # one bad per second for 12 s, 3 good each second
        clock.now = 2000.0 + second
        run(b, bad=1 if second % 4 == 0 else 0, good=3)
    snap = b.snapshot()
    assert snap["total"] == 10 * 3 + 2  # seconds 2002..2011: 30 good and bad at 2004, 2008
    assert snap["bad"] == 2


# ---- open, half open, probes -----------------------------------------------------------------


def test_open_for_open_s_then_probes_then_closed_with_an_empty_window() -> None:
    clock = Clock()
    b = breaker(clock)
    trip(b, clock)
    clock.now += 29.9
    assert b.allow_stream() is None
    clock.now += 0.1
    probes = [b.allow_stream() for _ in range(3)]
    assert b.state == HALF_OPEN and None not in probes and STREAM not in probes
    assert b.allow_stream() is None  # the rest still take the complete path
    assert b.open_value() == 1.0
    for ticket in probes[:2]:
        assert ticket is not None
        b.record(ticket, good=True)
    assert b.state == HALF_OPEN
    assert probes[2] is not None
    b.record(probes[2], good=True)
    assert b.state == CLOSED and b.open_value() == 0.0
    assert (b.snapshot()["total"], b.snapshot()["bad"]) == (0, 0)
    assert b.allow_stream() == STREAM
    assert b.changes == [OPEN, HALF_OPEN, CLOSED]


def test_late_outcomes_of_requests_that_were_no_probes_do_not_close_it() -> None:
    clock = Clock()
    b = breaker(clock)
    early = [b.allow_stream() for _ in range(30)]  # in flight before it opens
    trip(b, clock)
    for ticket in early[:10]:
        assert ticket is not None
        b.record(ticket, good=True)  # while open
    assert b.state == OPEN and b.snapshot()["total"] == 20  # nor counted in the window
    clock.now += 30
    probe = b.allow_stream()
    assert b.state == HALF_OPEN
    for ticket in early[10:]:
        assert ticket is not None
        b.record(ticket, good=True)  # while half open
    assert b.state == HALF_OPEN
    assert b.snapshot()["total"] == 0  # the window slid on, and they were not counted
    assert probe is not None
    b.record(probe, good=True)
    assert b.state == HALF_OPEN  # 1 of 3 probes


def test_a_failed_probe_opens_it_again_and_its_round_no_longer_counts() -> None:
    clock = Clock()
    b = breaker(clock)
    trip(b, clock)
    clock.now += 30
    first, second, third = (b.allow_stream() for _ in range(3))
    assert first is not None and second is not None and third is not None
    b.record(first, good=True)
    b.record(second, good=False)
    assert b.state == OPEN and b.allow_stream() is None
    b.record(third, good=True)  # a probe of the failed round: too late to decide anything
    assert b.state == OPEN
    clock.now += 29.0
    assert b.allow_stream() is None  # open for open_s again, from the failed probe
    clock.now += 1.0
    again = [b.allow_stream() for _ in range(3)]
    assert b.state == HALF_OPEN and None not in again and first not in again
    b.record(first, good=True)  # from two rounds ago
    assert b.state == HALF_OPEN
    for ticket in again:
        assert ticket is not None
        b.record(ticket, good=True)
    assert b.state == CLOSED
    assert b.changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_probes_that_never_report_are_replaced_after_open_s() -> None:
    clock = Clock()
    b = breaker(clock)
    trip(b, clock)
    clock.now += 30
    lost = [b.allow_stream() for _ in range(3)]  # their outcomes never come
    assert None not in lost
    clock.now += 29.0
    assert b.allow_stream() is None  # still waiting for them
    clock.now += 1.0
    fresh = [b.allow_stream() for _ in range(3)]
    assert None not in fresh and not set(fresh) & set(lost)
    assert b.allow_stream() is None
    for ticket in lost:
        assert ticket is not None
        b.record(ticket, good=True)  # they turn up after all: the round moved on
    assert b.state == HALF_OPEN
    for ticket in fresh:
        assert ticket is not None
        b.record(ticket, good=True)
    assert b.state == CLOSED


def test_a_probe_whose_outcome_does_not_count_frees_its_slot() -> None:
    clock = Clock()
    b = breaker(clock, probes=2)
    trip(b, clock)
    clock.now += 30
    one, two = b.allow_stream(), b.allow_stream()
    assert one is not None and two is not None and b.allow_stream() is None
    b.forget(one)  # e.g. rejected RATE_LIMITED: says nothing about the stream path
    three = b.allow_stream()
    assert three is not None and b.allow_stream() is None
    b.record(two, good=True)
    assert b.state == HALF_OPEN
    b.record(three, good=True)
    assert b.state == CLOSED


def test_disabled_it_never_opens() -> None:
    b = breaker(Clock(), enabled=False)
    run(b, bad=100)
    assert b.state == CLOSED and b.allow_stream() == STREAM and b.open_value() == 0.0


def test_small_settings_as_the_integration_test_uses_them() -> None:
    clock = Clock()
    b = breaker(clock, window_s=10, min_requests=5, open_s=2.0, probes=2)
    run(b, bad=4)
    assert b.state == CLOSED
    run(b, bad=1)
    assert b.state == OPEN
    clock.now += 2.0
    snap = b.snapshot()  # the snapshot sees the time pass too
    assert snap["state"] == HALF_OPEN and snap["since"] == round(WALL + clock.now, 3)
    assert snap["id"] == "r1" and snap["probes"] == {"issued": 0, "passed": 0, "of": 2}


@pytest.mark.parametrize(
    ("ok", "fell_back", "code", "rejected", "expected"),
    [
        (True, False, None, False, True),
        (True, True, None, False, False),  # fell back: the room got its answer, the stream failed
        (False, True, ErrorCode.MODEL_ERROR, False, False),
        (False, False, ErrorCode.STREAM_TIMEOUT, False, False),
        (False, False, ErrorCode.BACKEND_UNAVAILABLE, True, False),  # stream could not open
        (False, False, ErrorCode.BACKEND_FAILED, True, False),
        (False, False, ErrorCode.RATE_LIMITED, True, None),
        (False, False, ErrorCode.ROOM_BUSY, True, None),
        (False, False, ErrorCode.BUDGET_EXCEEDED, True, None),
        (False, False, ErrorCode.INVALID_PAYLOAD, True, None),
        (False, False, ErrorCode.FORBIDDEN, True, None),
        (False, False, ErrorCode.CANCELLED, False, None),
    ],
)
def test_what_counts_as_good_and_bad(
    ok: bool, fell_back: bool, code: ErrorCode | None, rejected: bool, expected: bool | None
) -> None:
    assert verdict(ok=ok, fell_back=fell_back, code=code, rejected=rejected) is expected


# ---- settings --------------------------------------------------------------------------------


def test_settings_from_the_environment_with_bounds() -> None:
    assert Settings.from_env({}).breaker == BreakerSettings()
    env = {
        "BRIDGE_BREAKER_ENABLED": "false", "BRIDGE_BREAKER_WINDOW_S": "10",
        "BRIDGE_BREAKER_MIN_REQUESTS": "5", "BRIDGE_BREAKER_FAILURE_RATIO": "0.5",
        "BRIDGE_BREAKER_OPEN_S": "2", "BRIDGE_BREAKER_PROBES": "2",
    }  # fmt: skip
    assert Settings.from_env(env).breaker == BreakerSettings(
        enabled=False, window_s=10, min_requests=5, failure_ratio=0.5, open_s=2.0, probes=2
    )
    for name, value in [
        ("BRIDGE_BREAKER_WINDOW_S", "0"), ("BRIDGE_BREAKER_WINDOW_S", "3601"),
        ("BRIDGE_BREAKER_WINDOW_S", "1.5"), ("BRIDGE_BREAKER_MIN_REQUESTS", "0"),
        ("BRIDGE_BREAKER_FAILURE_RATIO", "1.5"), ("BRIDGE_BREAKER_FAILURE_RATIO", "nan"),
        ("BRIDGE_BREAKER_OPEN_S", "0"), ("BRIDGE_BREAKER_PROBES", "0"),
        ("BRIDGE_BREAKER_ENABLED", "maybe"),
    ]:  # fmt: skip
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: value})


# ---- snapshots in Redis ----------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/9", decode_responses=True)
    await client.delete(BREAKERS_KEY)
    yield client
    await client.delete(BREAKERS_KEY)
    await client.aclose()


async def test_snapshots_are_published_and_read_back_fresh_ones_only(redis: Redis) -> None:
    clock = Clock()
    one, two = breaker(clock), Breaker("r2")
    trip(one, clock)
    await write_breaker(redis, one)
    await write_breaker(redis, two)
    old = {"id": "gone", "state": "open", "since": 1.0, "total": 0, "bad": 0, "at": 1.0}
    await redis.hset(BREAKERS_KEY, mapping={"gone": json.dumps(old), "garbled": "{not json"})
    assert 0 < await redis.ttl(BREAKERS_KEY) <= 300  # the hash expires once nobody writes it

    read = await read_breakers(redis)
    assert [(s["id"], s["state"]) for s in read] == [("r1", OPEN), ("r2", CLOSED)]
    assert read[0]["total"] == 20 and read[0]["bad"] == 10
    assert abs(read[0]["at"] - time.time()) < 5
    assert set(await redis.hkeys(BREAKERS_KEY)) == {"r1", "r2"}  # stale fields deleted

    assert await read_breakers(redis, stale_s=-1.0) == []  # everything is stale now
    assert await redis.hkeys(BREAKERS_KEY) == []
