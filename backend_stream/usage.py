"""Usage per user and UTC day, and the daily budgets checked before the model is called.

Counters live in one Redis hash per user and day (``bs:usage:{day}:{userId}``) and one for the
whole service (``bs:usage:{day}:_service``), fields: ``prompt``, ``completion`` (settled tokens),
``micro`` (settled cost in micro-USD, integers so that increments are exact), ``res_tokens`` and
``res_micro`` (reservations outstanding). They expire two days after their day.

A new generation *reserves* its maximum before the model is called (``RESERVE_SCRIPT``, one
round trip, atomic): its output budget plus ``BUDGET_PROMPT_RESERVE_TOKENS`` for the prompt,
and their price. It is admitted while the settled usage plus the outstanding reservations are
below every budget (the user's tokens and USD, the service's USD); else it is refused with
``BUDGET_EXCEEDED`` and ``Retry-After`` until the next UTC midnight. When it ends (done, failed,
cancelled) it *settles* (``SETTLE_SCRIPT``): the reservation is released and the provider's
real usage counted. So concurrent requests of one user cannot overspend by more than one
request's reservation: each is admitted only while the sum so far is under the budget, and no
request uses more than it reserved (as long as its prompt stays under the prompt reserve; any
excess is still counted).

Each reservation has its own key (``bs:resv:{userId}:{requestId}``) naming its day and amounts:
a retry of the same generation reserves nothing twice, a settle runs once (the key is deleted by
the script that settles), and the key's TTL bounds a reservation whose process died: expired
reservations are subtracted again by the next reserve of that user (``bs:resv-open:{day}:{userId}``
lists them with their expiry), so a crash never locks a user out until midnight.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, cast

import structlog
from redis.asyncio import Redis

from backend_stream.errors import RequestRejected
from backend_stream.metrics import Metrics
from backend_stream.settings import BudgetSettings
from contracts import ErrorCode, Usage, UsageResponse
from contracts.backend import Budget

log = structlog.get_logger("backend_stream.usage")

SERVICE = "_service"
MICRO = 1_000_000
KEEP_DAYS_S = 2 * 86_400
RESERVATION_TTL_S = 3_600  # longer than any generation (MODEL_TOTAL_TIMEOUT_S, a task's timeout)
NO_LIMIT = -1

# KEYS: user hash, service hash, reservation key, user's open reservations (zset).
# ARGV: reserve tokens, reserve micro, user token budget, user micro budget, service micro
# budget (-1: none), now (epoch s), reservation ttl s, hash ttl s, day.
# Returns {1} admitted and reserved, {2} already reserved (a retry), {0, which} refused.
RESERVE_SCRIPT = """
local now = tonumber(ARGV[6])
-- reservations of this user whose process died: give them back
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, member in ipairs(dead) do
  local t, m = string.match(member, '^[^ ]+ (%d+) (%d+)$')
  if t then
    redis.call('HINCRBY', KEYS[1], 'res_tokens', -tonumber(t))
    redis.call('HINCRBY', KEYS[1], 'res_micro', -tonumber(m))
    redis.call('HINCRBY', KEYS[2], 'res_micro', -tonumber(m))
  end
  redis.call('ZREM', KEYS[4], member)
end
if redis.call('EXISTS', KEYS[3]) == 1 then return {2} end
local u = redis.call('HMGET', KEYS[1], 'prompt', 'completion', 'micro', 'res_tokens', 'res_micro')
local tokens = (tonumber(u[1]) or 0) + (tonumber(u[2]) or 0) + (tonumber(u[4]) or 0)
local micro = (tonumber(u[3]) or 0) + (tonumber(u[5]) or 0)
local tb, mb, sb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if tb >= 0 and tokens >= tb then return {0, 'user_tokens'} end
if mb >= 0 and micro >= mb then return {0, 'user_usd'} end
if sb >= 0 then
  local s = redis.call('HMGET', KEYS[2], 'micro', 'res_micro')
  if (tonumber(s[1]) or 0) + (tonumber(s[2]) or 0) >= sb then return {0, 'service_usd'} end
end
local rt, rm = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('HINCRBY', KEYS[1], 'res_tokens', rt)
redis.call('HINCRBY', KEYS[1], 'res_micro', rm)
redis.call('HINCRBY', KEYS[2], 'res_micro', rm)
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('EXPIRE', KEYS[2], ARGV[8])
local member = KEYS[3] .. ' ' .. rt .. ' ' .. rm
redis.call('SET', KEYS[3], ARGV[9] .. ' ' .. rt .. ' ' .. rm, 'EX', ARGV[7])
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[7]), member)
redis.call('EXPIRE', KEYS[4], ARGV[8])
return {1}
"""

# KEYS: user hash, service hash, reservation key, open reservations. ARGV: prompt, completion,
# micro, hash ttl s. Releases the reservation and counts the real usage, once: 0 when the
# reservation was already settled (or never made).
SETTLE_SCRIPT = """
local r = redis.call('GET', KEYS[3])
if not r then return 0 end
local day, t, m = string.match(r, '^([^ ]+) (%d+) (%d+)$')
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], KEYS[3] .. ' ' .. t .. ' ' .. m)
redis.call('HINCRBY', KEYS[1], 'res_tokens', -tonumber(t))
redis.call('HINCRBY', KEYS[1], 'res_micro', -tonumber(m))
redis.call('HINCRBY', KEYS[2], 'res_micro', -tonumber(m))
for i, key in ipairs({KEYS[1], KEYS[2]}) do
  redis.call('HINCRBY', key, 'prompt', ARGV[1])
  redis.call('HINCRBY', key, 'completion', ARGV[2])
  redis.call('HINCRBY', key, 'micro', ARGV[3])
  redis.call('EXPIRE', key, ARGV[4])
end
return 1
"""


def utc_day(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d")


def seconds_to_midnight(now: dt.datetime | None = None) -> float:
    now = now or dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return max(1.0, math.ceil((midnight - now).total_seconds()))


def usage_key(day: str, user_id: str) -> str:
    return f"bs:usage:{day}:{user_id}"


def reservation_key(user_id: str, request_id: str) -> str:
    return f"bs:resv:{user_id}:{request_id}"


def open_key(day: str, user_id: str) -> str:
    return f"bs:resv-open:{day}:{user_id}"


class UsageLedger:
    """Reserve before the model call, settle at the end, read a user's day."""

    def __init__(self, redis: Redis, budget: BudgetSettings, metrics: Metrics) -> None:
        self._redis = redis
        self.budget = budget
        self._metrics = metrics
        self._reserve = redis.register_script(RESERVE_SCRIPT)
        self._settle = redis.register_script(SETTLE_SCRIPT)

    def micro_usd(self, prompt_tokens: int, completion_tokens: int) -> int:
        price = self.budget.price
        usd = (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000
        return math.ceil(usd * MICRO)

    async def reserve(self, user_id: str, request_id: str, max_output_tokens: int) -> bool:
        """Admit a new generation under the budgets or raise ``BUDGET_EXCEEDED`` (429); True
        when this call made the reservation (False: the request had one already)."""
        b = self.budget
        day = utc_day()
        tokens = max_output_tokens + b.prompt_reserve_tokens
        micro = self.micro_usd(b.prompt_reserve_tokens, max_output_tokens)
        limits = [
            NO_LIMIT if b.user_daily_tokens is None else b.user_daily_tokens,
            NO_LIMIT if b.user_daily_usd is None else round(b.user_daily_usd * MICRO),
            NO_LIMIT if b.service_daily_usd is None else round(b.service_daily_usd * MICRO),
        ]
        now = dt.datetime.now(dt.UTC)
        reply = await self._reserve(
            keys=[
                usage_key(day, user_id), usage_key(day, SERVICE),
                reservation_key(user_id, request_id), open_key(day, user_id),
            ],
            args=[
                tokens, micro, *limits, int(now.timestamp()), RESERVATION_TTL_S, KEEP_DAYS_S,
                day,
            ],
        )  # fmt: skip
        if int(reply[0]) == 0:
            which = reply[1] if len(reply) > 1 else "budget"
            which = which.decode() if isinstance(which, bytes) else str(which)
            self._metrics.budget_refusals.labels(which).inc()
            log.info("budget_exceeded", budget=which)
            raise RequestRejected(
                ErrorCode.BUDGET_EXCEEDED,
                "the daily budget is spent"
                + (" (the service's)" if which == "service_usd" else "")
                + "; it resets at 00:00 UTC",
                retry_after_s=seconds_to_midnight(now),
            )
        return int(reply[0]) == 1

    async def settle(self, user_id: str, request_id: str, usage: Usage | None) -> bool:
        """Release the request's reservation and count its real usage (once)."""
        raw = await cast(Any, self._redis.get(reservation_key(user_id, request_id)))
        if raw is None:
            return False
        raw = raw.decode() if isinstance(raw, bytes) else raw
        day = raw.split(" ", 1)[0]
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        micro = self.micro_usd(prompt, completion)
        settled = await self._settle(
            keys=[
                usage_key(day, user_id), usage_key(day, SERVICE),
                reservation_key(user_id, request_id), open_key(day, user_id),
            ],
            args=[prompt, completion, micro, KEEP_DAYS_S],
        )  # fmt: skip
        if settled:
            self._metrics.cost_usd.inc(micro / MICRO)
        return bool(settled)

    async def release(self, user_id: str, request_id: str) -> None:
        """A reservation whose generation never ran (it attached to an existing one)."""
        await self.settle(user_id, request_id, None)

    async def read(self, user_id: str, day: str) -> UsageResponse:
        raw = await cast(Any, self._redis.hgetall(usage_key(day, user_id)))
        values = {
            (k.decode() if isinstance(k, bytes) else k): int(v) for k, v in (raw or {}).items()
        }
        prompt, completion = values.get("prompt", 0), values.get("completion", 0)
        micro = values.get("micro", 0)
        b = self.budget
        remaining = Budget(
            tokens=None
            if b.user_daily_tokens is None
            else max(0, b.user_daily_tokens - prompt - completion - values.get("res_tokens", 0)),
            cost_usd=None
            if b.user_daily_usd is None
            else max(0.0, b.user_daily_usd - (micro + values.get("res_micro", 0)) / MICRO),
        )
        return UsageResponse(
            user_id=user_id, day=day, prompt_tokens=prompt, completion_tokens=completion,
            cost_usd=micro / MICRO,
            budget=Budget(tokens=b.user_daily_tokens, cost_usd=b.user_daily_usd),
            remaining=remaining,
        )  # fmt: skip
