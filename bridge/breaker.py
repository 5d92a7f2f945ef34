"""The per-replica circuit breaker of the stream path (CONTRACT.md section 5).

Over the last ``window_s`` (30 s), when at least ``min_requests`` (20) stream-path requests
finished and more than ``failure_ratio`` (20 %) of them failed or fell back, the breaker opens:
for ``open_s`` (30 s) every new request of this replica takes the complete path. Then it is
half open: the next ``probes`` (3) requests take the stream path again (the rest still the
complete path); all of them good closes it (its window starts empty), any of them bad opens it
again for ``open_s``. Probes that never report (a lost outcome) do not wedge it: ``open_s`` after
the last probe slot was handed out, a new round of probes is let through.

Pure logic, O(1) per request: the window is a fixed ring of one-second buckets (no per-request
list), the clocks are injectable. ``allow_stream`` hands out tickets so that only the probes'
outcomes decide the half-open state: a request that started before the breaker opened and
finishes late is not a probe. The state is the metric ``bridge_breaker_open{replica}`` and, for
the operators and the rollout controller, a snapshot per replica in the Redis hash
``bridge:breakers`` (``write_breaker``, ``read_breakers``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.errors import store_errors
from bridge.settings import BreakerSettings
from contracts import ErrorCode
from contracts.aio import awaited

log = structlog.get_logger("bridge.breaker")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

STREAM = 0  # the ticket of an ordinary stream-path request; probes get their round (>= 1)

BREAKERS_KEY = "bridge:breakers"  # hash: replica id -> snapshot JSON with "at" (epoch s)
BREAKERS_TTL_S = 300  # re-armed by every write: the hash goes once no replica writes it
MAX_STALE_DELETED = 64  # stale fields removed per read_breakers, oldest first

# Rejections that are the user's or the room's doing: they say nothing about the stream path.
NOT_COUNTED: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.INVALID_PAYLOAD,
        ErrorCode.EMPTY_MESSAGE,
        ErrorCode.MESSAGE_TOO_LONG,
        ErrorCode.FORBIDDEN,
        ErrorCode.NOT_FOUND,
        ErrorCode.RATE_LIMITED,
        ErrorCode.BUDGET_EXCEEDED,
        ErrorCode.ROOM_BUSY,
        ErrorCode.CANCELLED,
    }
)

# Delete each given field only while it still holds the value read (a replica that rewrote its
# snapshot meanwhile keeps it). KEYS[1]: the hash; ARGV: field, value, field, value, ...
DELETE_UNCHANGED_SCRIPT = """
local gone = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    gone = gone + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return gone
"""


def verdict(*, ok: bool, fell_back: bool, code: ErrorCode | None, rejected: bool) -> bool | None:
    """How a finished stream-path request counts: ``True`` good (streamed and ended), ``False``
    bad (failed, or fell back), ``None`` not at all (the user's or the room's rejection, a
    cancel). A rejection for any other reason (the backend unavailable, ...) is bad."""
    if code is ErrorCode.CANCELLED or (rejected and code in NOT_COUNTED):
        return None
    return ok and not fell_back


class Breaker:
    """One replica's breaker. ``allow_stream`` once per ``send_message`` the flags stream; the
    ticket it returns goes back to ``record`` (or ``forget``) when that request finishes."""

    def __init__(
        self,
        replica_id: str,
        *,
        enabled: bool = True,
        window_s: int = 30,
        min_requests: int = 20,
        failure_ratio: float = 0.2,
        open_s: float = 30.0,
        probes: int = 3,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_change: Callable[[], object] | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.enabled = enabled
        self._size = max(1, int(window_s))
        self._min_requests = max(1, min_requests)
        self._ratio = failure_ratio
        self._open_s = open_s
        self._probes = max(1, probes)
        self._clock = clock
        self._wall = wall_clock
        self._on_change = on_change
        # The window: bucket i counts the finished requests of the second s with s % size == i,
        # for the seconds (head - size, head]; the sums are kept alongside.
        self._totals = [0] * self._size
        self._bads = [0] * self._size
        self._total = 0
        self._bad = 0
        self._head: int | None = None
        self.state = CLOSED
        self._since = wall_clock()  # epoch seconds of the last state change
        self._until = 0.0  # open: when (clock) it turns half open
        self._round = 0  # the probe round; a probe's ticket names it
        self._issued = 0  # probe tickets of this round handed out (and not forgotten)
        self._passed = 0  # good outcomes of this round's probes
        self._full_at = 0.0  # clock when the last probe slot of this round was handed out

    @classmethod
    def from_settings(
        cls,
        replica_id: str,
        settings: BreakerSettings,
        *,
        on_change: Callable[[], object] | None = None,
    ) -> Breaker:
        return cls(
            replica_id,
            enabled=settings.enabled,
            window_s=settings.window_s,
            min_requests=settings.min_requests,
            failure_ratio=settings.failure_ratio,
            open_s=settings.open_s,
            probes=settings.probes,
            on_change=on_change,
        )

    # ---- per request ------------------------------------------------------------------------

    def allow_stream(self) -> int | None:
        """``None``: take the complete path. Otherwise the request's ticket for ``record``:
        ``STREAM`` (0) for an ordinary request, a probe's round (>= 1) when half open. Test
        with ``is None``: the ordinary ticket is falsy."""
        if self.state == CLOSED:
            return STREAM
        now = self._clock()
        if self.state == OPEN:
            if now < self._until:
                return None
            self._half_open(now)
        if self._issued >= self._probes:
            if now - self._full_at < self._open_s:
                return None
            # Every slot handed out open_s ago and still undecided: outcomes were lost.
            log.warning("breaker_probes_lost", replica=self.replica_id, round=self._round)
            self._new_round()
        self._issued += 1
        if self._issued == self._probes:
            self._full_at = now
        return self._round

    def record(self, ticket: int, *, good: bool) -> None:
        """The outcome of the request ``ticket`` was handed out for."""
        if ticket == STREAM:
            if self.state == CLOSED and self.enabled:
                self._count(good)
            return
        if self.state != HALF_OPEN or ticket != self._round:
            return  # a probe of an earlier round: the breaker moved on without it
        if not good:
            self._open(self._clock(), "probe_failed")
            return
        self._passed += 1
        if self._passed >= self._probes:
            self._close()

    def forget(self, ticket: int) -> None:
        """The request ``ticket`` ended in a way that does not count (``verdict`` is ``None``):
        a probe's slot is free again for the next request."""
        if ticket != STREAM and self.state == HALF_OPEN and ticket == self._round:
            self._issued = max(self._passed, self._issued - 1)

    # ---- views ------------------------------------------------------------------------------

    def open_value(self) -> float:
        """The gauge ``bridge_breaker_open``: 1 open or half open, 0 closed."""
        return 0.0 if self.state == CLOSED else 1.0

    def snapshot(self) -> dict[str, Any]:
        """The state for the operators: ``{id, state, since, total, bad, enabled, probes}``
        (``since`` in epoch seconds; ``total``/``bad`` the window now)."""
        now = self._clock()
        if self.state == OPEN and now >= self._until:
            self._half_open(now)
        self._roll(math.floor(now))
        return {
            "id": self.replica_id,
            "state": self.state,
            "since": round(self._since, 3),
            "total": self._total,
            "bad": self._bad,
            "enabled": self.enabled,
            "probes": {"issued": self._issued, "passed": self._passed, "of": self._probes},
        }

    # ---- internals --------------------------------------------------------------------------

    def _count(self, good: bool) -> None:
        now = self._clock()
        second = math.floor(now)
        self._roll(second)
        i = second % self._size
        self._totals[i] += 1
        self._total += 1
        if not good:
            self._bads[i] += 1
            self._bad += 1
        if self._total >= self._min_requests and self._bad / self._total > self._ratio:
            self._open(now, "failures")

    def _roll(self, second: int) -> None:
        """Empty the buckets of the seconds that left the window when it reaches ``second``."""
        head = self._head
        if head is None or second > head:
            if head is not None:
                for s in range(head + 1, head + 1 + min(second - head, self._size)):
                    i = s % self._size
                    self._total -= self._totals[i]
                    self._bad -= self._bads[i]
                    self._totals[i] = 0
                    self._bads[i] = 0
            self._head = second

    def _clear(self) -> None:
        self._totals = [0] * self._size
        self._bads = [0] * self._size
        self._total = 0
        self._bad = 0

    def _new_round(self) -> None:
        self._round += 1
        self._issued = 0
        self._passed = 0

    def _open(self, now: float, reason: str) -> None:
        was = self.state
        self.state = OPEN
        self._until = now + self._open_s
        self._new_round()  # probes still out can no longer decide anything
        log.warning(
            "breaker_opened", replica=self.replica_id, reason=reason, was=was,
            total=self._total, bad=self._bad, open_s=self._open_s,
        )  # fmt: skip
        self._changed()

    def _half_open(self, now: float) -> None:
        self.state = HALF_OPEN
        self._new_round()
        log.info("breaker_half_open", replica=self.replica_id, probes=self._probes)
        self._changed()

    def _close(self) -> None:
        self.state = CLOSED
        self._clear()
        self._new_round()
        log.info("breaker_closed", replica=self.replica_id, probes=self._probes)
        self._changed()

    def _changed(self) -> None:
        self._since = self._wall()
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("breaker_on_change_failed", replica=self.replica_id)


# ---- shared state in Redis ----------------------------------------------------------------


async def write_breaker(redis: Redis, breaker: Breaker) -> None:
    """Write ``breaker``'s snapshot (with ``at``, epoch seconds now) to ``bridge:breakers``.
    A Redis failure is logged, never raised: requests do not depend on it."""
    snapshot = breaker.snapshot()
    snapshot["at"] = round(time.time(), 3)
    body = json.dumps(snapshot, separators=(",", ":"))
    try:
        async with redis.pipeline(transaction=True) as pipe:  # never seen without its expiry
            pipe.hset(BREAKERS_KEY, breaker.replica_id, body)
            pipe.expire(BREAKERS_KEY, BREAKERS_TTL_S)
            await pipe.execute()
    except (RedisError, OSError) as exc:
        log.warning("breaker_publish_failed", replica=breaker.replica_id, error=type(exc).__name__)


async def remove_breaker(redis: Redis, replica_id: str) -> None:
    """A replica that stops takes its snapshot out (best effort: else it goes stale)."""
    try:
        await awaited(redis.hdel(BREAKERS_KEY, replica_id))
    except (RedisError, OSError) as exc:
        log.warning("breaker_remove_failed", replica=replica_id, error=type(exc).__name__)


async def read_breakers(redis: Redis, *, stale_s: float = 15.0) -> list[dict[str, Any]]:
    """Every replica's snapshot written in the last ``stale_s`` seconds, by replica id. Stale
    or unreadable fields (replicas gone) are deleted, the oldest ``MAX_STALE_DELETED`` per call.
    Raises ``StoreError`` when Redis cannot be read."""
    async with store_errors("breakers"):
        raw = await awaited(redis.hgetall(BREAKERS_KEY))
    now = time.time()
    fresh: list[dict[str, Any]] = []
    stale: list[tuple[float, str, str]] = []
    for field, value in raw.items():
        name, text = _text(field), _text(value)
        try:
            snapshot = json.loads(text)
            at = float(snapshot["at"])
        except (ValueError, KeyError, TypeError):
            stale.append((-math.inf, name, text))
            continue
        if math.isfinite(at) and now - at <= stale_s:
            fresh.append(snapshot)
        else:
            stale.append((at if math.isfinite(at) else -math.inf, name, text))
    if stale:
        stale.sort(key=lambda item: item[0])
        args = [part for _, name, text in stale[:MAX_STALE_DELETED] for part in (name, text)]
        try:
            await awaited(redis.eval(DELETE_UNCHANGED_SCRIPT, 1, BREAKERS_KEY, *args))
        except (RedisError, OSError) as exc:
            log.warning("breakers_cleanup_failed", error=type(exc).__name__)
    fresh.sort(key=lambda snapshot: str(snapshot.get("id", "")))
    return fresh


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
