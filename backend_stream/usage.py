"""Usage per user and UTC day, and the daily budgets checked before the model is called.

Counters live in one Redis hash per user and day (``bs:usage:{day}:{userId}``) and one for the
whole service (``bs:usage:{day}:_service``), fields: ``prompt``, ``completion`` (settled tokens),
``micro`` (settled cost in micro-USD, integers so that increments are exact), ``res_tokens`` and
``res_micro`` (reservations outstanding). They expire two days after their day.

A new generation *reserves* its maximum before anything is stored (``RESERVE_SCRIPT``, one round
trip, atomic): its output budget plus ``BUDGET_PROMPT_RESERVE_TOKENS`` for the prompt, and their
price. It is admitted while the settled usage plus the outstanding reservations are below every
budget (the user's tokens and USD, the service's USD); else it is refused with
``BUDGET_EXCEEDED`` and ``Retry-After`` until the next UTC midnight. Once its prompt is built
(history included) and before the model is called, a prompt larger than the reserve *tops up*
the reservation by the difference under the same rule, or the generation is refused then
(``TOP_UP_SCRIPT``). When it ends (done, failed, cancelled) it *settles* (``SETTLE_SCRIPT``): the
reservation is given back and the provider's real usage counted; a generation the provider
reported no usage for (cancelled or failed mid-stream: usage comes last) counts an estimate
from its prompt's and its text's length. So concurrent requests of one user cannot overspend by
more than one request's reservation: each is admitted, and each top-up, only while the sum so
far is under the budget, and no request uses more than it reserved.

Each reservation is a key (``bs:resv:{userId}:{requestId}``: its day and amounts, with a TTL
longer than any generation or queued task) and a member of the day's sorted set of open
reservations (``bs:resv-open:{day}``, scored by expiry on Redis's clock). Whoever removes the
member gives the amounts back, exactly once: the settle, or any later reserve that finds it
expired (its process died; up to 20 per call), so a crash never holds a user's or the service's
budget until midnight. A retry of the same generation reserves nothing twice; a settle runs
once (the script deletes the key).
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

# Every script reads the clock from Redis (TIME), never a replica's: one clock for expiry.
# A reservation is a key (``bs:resv:{userId}:{requestId}`` -> "<day> <tokens> <micro>", with a
# TTL) and a member "<userId> <requestId> <tokens> <micro>" of the day's sorted set of open
# reservations (``bs:resv-open:{day}``, scored by expiry). Whoever removes the member (a settle,
# a top-up, or a reserve that finds it expired: its process died) gives its amounts back, once.
_GIVE_BACK_DEAD = """
local now = tonumber(redis.call('TIME')[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 20)
for _, member in ipairs(dead) do
  local user, t, m = string.match(member, '^(%S+) %S+ (%d+) (%d+)$')
  if user and redis.call('ZREM', KEYS[4], member) == 1 then
    local ukey = ARGV[#ARGV] .. user
    redis.call('HINCRBY', ukey, 'res_tokens', -tonumber(t))
    redis.call('HINCRBY', ukey, 'res_micro', -tonumber(m))
    redis.call('HINCRBY', KEYS[2], 'res_micro', -tonumber(m))
  end
end
"""
_WITHIN_BUDGETS = """
local function over(tb, mb, sb)
  local u = redis.call('HMGET', KEYS[1], 'prompt', 'completion', 'micro', 'res_tokens', 'res_micro')
  local tokens = (tonumber(u[1]) or 0) + (tonumber(u[2]) or 0) + (tonumber(u[4]) or 0)
  local micro = (tonumber(u[3]) or 0) + (tonumber(u[5]) or 0)
  if tb >= 0 and tokens >= tb then return 'user_tokens' end
  if mb >= 0 and micro >= mb then return 'user_usd' end
  if sb >= 0 then
    local s = redis.call('HMGET', KEYS[2], 'micro', 'res_micro')
    if (tonumber(s[1]) or 0) + (tonumber(s[2]) or 0) >= sb then return 'service_usd' end
  end
  return nil
end
"""
# KEYS: user hash, service hash, reservation key, the day's open reservations.
# ARGV: tokens, micro, user token budget, user micro budget, service micro budget (-1: none),
# reservation ttl s, hash ttl s, day, userId, requestId, usage key prefix of the day.
# {1}: reserved; {2}: the request holds one already (a retry); {0, budget}: refused.
RESERVE_SCRIPT = (
    _GIVE_BACK_DEAD
    + _WITHIN_BUDGETS
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {2} end
local which = over(tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
if which then return {0, which} end
local rt, rm, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[6])
redis.call('HINCRBY', KEYS[1], 'res_tokens', rt)
redis.call('HINCRBY', KEYS[1], 'res_micro', rm)
redis.call('HINCRBY', KEYS[2], 'res_micro', rm)
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('SET', KEYS[3], ARGV[8] .. ' ' .. rt .. ' ' .. rm, 'EX', ttl)
redis.call('ZADD', KEYS[4], now + ttl, ARGV[9] .. ' ' .. ARGV[10] .. ' ' .. rt .. ' ' .. rm)
redis.call('EXPIRE', KEYS[4], ARGV[7])
return {1}
"""
)
# The prompt turned out larger than its reserve: reserve the difference too, under the same
# rule (admitted while the day's sum is below every budget), before the model is called.
# KEYS as RESERVE. ARGV: extra tokens, extra micro, the three budgets, userId, requestId.
# {1}: done (or nothing reserved to extend); {0, budget}: refused.
TOP_UP_SCRIPT = (
    _WITHIN_BUDGETS
    + """
local r = redis.call('GET', KEYS[3])
if not r then return {1} end
local day, t, m = string.match(r, '^(%S+) (%d+) (%d+)$')
local member = ARGV[6] .. ' ' .. ARGV[7] .. ' ' .. t .. ' ' .. m
local score = redis.call('ZSCORE', KEYS[4], member)
if not score then return {1} end
local which = over(tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
if which then return {0, which} end
local nt, nm = tonumber(t) + tonumber(ARGV[1]), tonumber(m) + tonumber(ARGV[2])
redis.call('HINCRBY', KEYS[1], 'res_tokens', tonumber(ARGV[1]))
redis.call('HINCRBY', KEYS[1], 'res_micro', tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[2], 'res_micro', tonumber(ARGV[2]))
redis.call('ZREM', KEYS[4], member)
redis.call('ZADD', KEYS[4], score, ARGV[6] .. ' ' .. ARGV[7] .. ' ' .. nt .. ' ' .. nm)
redis.call('SET', KEYS[3], day .. ' ' .. nt .. ' ' .. nm, 'KEEPTTL')
return {1}
"""
)
# KEYS as RESERVE. ARGV: prompt, completion, micro, hash ttl s, userId, requestId.
# Counts the real usage and gives the reservation back, once: 0 when there was none to settle.
SETTLE_SCRIPT = """
local r = redis.call('GET', KEYS[3])
if not r then return 0 end
local day, t, m = string.match(r, '^(%S+) (%d+) (%d+)$')
redis.call('DEL', KEYS[3])
local member = ARGV[5] .. ' ' .. ARGV[6] .. ' ' .. t .. ' ' .. m
if redis.call('ZREM', KEYS[4], member) == 1 then  -- not given back already
  redis.call('HINCRBY', KEYS[1], 'res_tokens', -tonumber(t))
  redis.call('HINCRBY', KEYS[1], 'res_micro', -tonumber(m))
  redis.call('HINCRBY', KEYS[2], 'res_micro', -tonumber(m))
end
for _, key in ipairs({KEYS[1], KEYS[2]}) do
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


def open_key(day: str) -> str:
    return f"bs:resv-open:{day}"


def estimate_tokens(text_chars: int, chars_per_token: float = 4.0) -> int:
    """Tokens of a text the provider did not count (a failed or cancelled generation)."""
    return math.ceil(text_chars / chars_per_token) if text_chars > 0 else 0


class UsageLedger:
    """Reserve before the model call, top up once the prompt is known, settle at the end."""

    def __init__(
        self, redis: Redis, budget: BudgetSettings, metrics: Metrics, *,
        reservation_ttl_s: int = RESERVATION_TTL_S,
    ) -> None:  # fmt: skip
        self._redis = redis
        self.budget = budget
        self._metrics = metrics
        self._ttl_s = reservation_ttl_s
        self._reserve = redis.register_script(RESERVE_SCRIPT)
        self._top_up = redis.register_script(TOP_UP_SCRIPT)
        self._settle = redis.register_script(SETTLE_SCRIPT)

    def micro_usd(self, prompt_tokens: int, completion_tokens: int) -> int:
        price = self.budget.price
        usd = (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000
        return math.ceil(usd * MICRO)

    def _limits(self) -> list[int]:
        b = self.budget
        return [
            NO_LIMIT if b.user_daily_tokens is None else b.user_daily_tokens,
            NO_LIMIT if b.user_daily_usd is None else round(b.user_daily_usd * MICRO),
            NO_LIMIT if b.service_daily_usd is None else round(b.service_daily_usd * MICRO),
        ]

    @staticmethod
    def _keys(day: str, user_id: str, request_id: str) -> list[str]:
        return [
            usage_key(day, user_id), usage_key(day, SERVICE),
            reservation_key(user_id, request_id), open_key(day),
        ]  # fmt: skip

    def _refused(self, reply: Any) -> RequestRejected:
        which = reply[1] if len(reply) > 1 else "budget"
        which = which.decode() if isinstance(which, bytes) else str(which)
        self._metrics.budget_refusals.labels(which).inc()
        log.info("budget_exceeded", budget=which)
        return RequestRejected(
            ErrorCode.BUDGET_EXCEEDED,
            "the daily budget is spent"
            + (" (the service's)" if which == "service_usd" else "")
            + "; it resets at 00:00 UTC",
            retry_after_s=seconds_to_midnight(),
        )

    async def reserve(self, user_id: str, request_id: str, max_output_tokens: int) -> bool:
        """Admit a new generation under the budgets or raise ``BUDGET_EXCEEDED`` (429); True
        when this call made the reservation (False: the request had one already)."""
        b = self.budget
        day = utc_day()
        tokens = max_output_tokens + b.prompt_reserve_tokens
        micro = self.micro_usd(b.prompt_reserve_tokens, max_output_tokens)
        reply = await self._reserve(
            keys=self._keys(day, user_id, request_id),
            args=[
                tokens, micro, *self._limits(), self._ttl_s, KEEP_DAYS_S, day, user_id,
                request_id, usage_key(day, ""),
            ],
        )  # fmt: skip
        if int(reply[0]) == 0:
            raise self._refused(reply)
        return int(reply[0]) == 1

    async def top_up(self, user_id: str, request_id: str, prompt_tokens: int) -> None:
        """The prompt is built: reserve what it needs beyond ``BUDGET_PROMPT_RESERVE_TOKENS``,
        or raise ``BUDGET_EXCEEDED`` before the model is called."""
        extra = prompt_tokens - self.budget.prompt_reserve_tokens
        if extra <= 0:
            return
        raw = await cast(Any, self._redis.get(reservation_key(user_id, request_id)))
        if raw is None:
            return
        day = (raw.decode() if isinstance(raw, bytes) else raw).split(" ", 1)[0]
        reply = await self._top_up(
            keys=self._keys(day, user_id, request_id),
            args=[extra, self.micro_usd(extra, 0), *self._limits(), user_id, request_id],
        )
        if int(reply[0]) == 0:
            raise self._refused(reply)

    async def settle(self, user_id: str, request_id: str, usage: Usage | None) -> bool:
        """Give the request's reservation back and count its real usage (once)."""
        raw = await cast(Any, self._redis.get(reservation_key(user_id, request_id)))
        if raw is None:
            return False
        day = (raw.decode() if isinstance(raw, bytes) else raw).split(" ", 1)[0]
        prompt = usage.prompt_tokens if usage else 0
        completion = usage.completion_tokens if usage else 0
        micro = self.micro_usd(prompt, completion)
        settled = await self._settle(
            keys=self._keys(day, user_id, request_id),
            args=[prompt, completion, micro, KEEP_DAYS_S, user_id, request_id],
        )
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
