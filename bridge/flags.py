"""Rollout flags: env defaults, overridden live from a Redis hash that every replica polls.

Evaluation for one user, first match wins (ARCHITECTURE.md "Rollout"):

1. ``enabled`` false (kill switch)         -> complete path for everyone;
2. user in ``deny_users``                  -> complete path;
3. user in ``allow_users`` or any of its roles in ``allow_roles`` -> stream path;
4. ``bucket(userId) < percent * 100``      -> stream path, else complete path.

The hash bucket: ``int.from_bytes(sha256(b"chat-streaming:" + userId.encode()).digest()[:8],
"big") % 10_000``, i.e. a stable number in 0..9999 per user. A user is streamed at percent ``p``
iff its bucket is below ``p * 100``, so raising the percentage only ever adds users (sticky and
monotonic), and a user's path never changes while the percentage does not.

Redis hash ``bridge:flags`` holds the overrides as strings (``enabled``, ``percent``,
``allow_users``, ``allow_roles``, ``deny_users``, ``fallback``); a field it lacks takes the env
default. Each replica re-reads it every ``flags_refresh_s`` (<= 1 s) in a background task.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import structlog
from redis.asyncio import Redis

from bridge.errors import StoreError, store_errors
from bridge.settings import FlagDefaults, parse_bool, parse_names
from contracts import utc_now_iso
from contracts.aio import awaited

log = structlog.get_logger("bridge.flags")

FLAGS_KEY = "bridge:flags"
AUDIT_KEY = "bridge:audit"  # newest first, JSON entries {at, actor, action, before, after, reason}
AUDIT_MAX = 1000
BUCKETS = 10_000
BUCKET_SALT = b"chat-streaming:"
MAX_BACKOFF_S = 5.0
FIELDS = ("enabled", "percent", "allow_users", "allow_roles", "deny_users", "fallback")
# each field's name on the operators' API (CONTRACT.md section 4: camelCase)
WIRE_NAMES = {
    "enabled": "enabled", "percent": "percent", "allow_users": "allowUsers",
    "allow_roles": "allowRoles", "deny_users": "denyUsers", "fallback": "fallback",
}  # fmt: skip


def bucket(user_id: str) -> int:
    """The user's sticky rollout bucket, 0..9999 (see the module docstring)."""
    digest = hashlib.sha256(BUCKET_SALT + user_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True, slots=True)
class Decision:
    streaming: bool
    reason: str  # kill_switch | denied | allow_user | allow_role | percent


def decide(flags: FlagDefaults, user_id: str, roles: Iterable[str]) -> Decision:
    """Which path this user's messages take under ``flags``."""
    if not flags.enabled:
        return Decision(False, "kill_switch")
    if user_id in flags.deny_users:
        return Decision(False, "denied")
    if user_id in flags.allow_users:
        return Decision(True, "allow_user")
    if flags.allow_roles.intersection(roles):
        return Decision(True, "allow_role")
    return Decision(bucket(user_id) < round(flags.percent * 100), "percent")


def parse_overrides(raw: Mapping[str, str], defaults: FlagDefaults) -> FlagDefaults:
    """Apply the Redis hash over the env defaults; a malformed field keeps its default."""
    flags = defaults
    for name, value in raw.items():
        try:
            flags = _apply(flags, name, value)
        except ValueError:
            log.warning("flag_ignored", field=name)
    return flags


def _apply(flags: FlagDefaults, name: str, value: str) -> FlagDefaults:
    if name in ("enabled", "fallback"):
        parsed = parse_bool(value)
        if parsed is None:
            raise ValueError(name)
        return (
            replace(flags, enabled=parsed) if name == "enabled" else replace(flags, fallback=parsed)
        )
    if name == "percent":
        percent = float(value)
        if not 0.0 <= percent <= 100.0:
            raise ValueError(name)
        return replace(flags, percent=percent)
    names = parse_names(value)
    if name == "allow_users":
        return replace(flags, allow_users=names)
    if name == "allow_roles":
        return replace(flags, allow_roles=names)
    if name == "deny_users":
        return replace(flags, deny_users=names)
    raise ValueError(name)


def validate_changes(changes: Mapping[str, str]) -> dict[str, str]:
    """Check ``name=value`` pairs for ``flags set``; raise ``ValueError`` naming a bad one."""
    checked: dict[str, str] = {}
    for name, value in changes.items():
        if name not in FIELDS:
            raise ValueError(f"unknown flag {name!r} (known: {', '.join(FIELDS)})")
        _apply(FlagDefaults(), name, value)
        if name in ("allow_users", "allow_roles", "deny_users"):
            value = ",".join(sorted(parse_names(value)))
        checked[name] = value.strip()
    return checked


def describe(flags: FlagDefaults) -> dict[str, object]:
    return {
        "enabled": flags.enabled,
        "percent": flags.percent,
        "allow_users": sorted(flags.allow_users),
        "allow_roles": sorted(flags.allow_roles),
        "deny_users": sorted(flags.deny_users),
        "fallback": flags.fallback,
    }


class FlagStore:
    """The current flags of this replica, refreshed from Redis in the background."""

    def __init__(self, redis: Redis, defaults: FlagDefaults, *, refresh_s: float) -> None:
        self._redis = redis
        self.defaults = defaults
        self.current = defaults
        self.loaded = False
        self._refresh_s = refresh_s

    async def load(self) -> FlagDefaults:
        async with store_errors("flags"):
            raw: dict[str, str] = await awaited(self._redis.hgetall(FLAGS_KEY))
        flags = parse_overrides(raw, self.defaults)
        if flags != self.current:
            log.info("flags_changed", **describe(flags))
        self.current, self.loaded = flags, True
        return flags

    async def poll_forever(self) -> None:
        backoff = self._refresh_s
        while True:
            try:
                await self.load()
                backoff = self._refresh_s
            except StoreError:
                log.warning("flags_refresh_failed", retry_in_s=backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            await asyncio.sleep(backoff)

    async def set(self, changes: Mapping[str, str]) -> FlagDefaults:
        checked = validate_changes(changes)
        if checked:
            await cast(Any, self._redis.hset(FLAGS_KEY, mapping=dict(checked.items())))
        return await self.load()

    async def reset(self) -> FlagDefaults:
        await self._redis.delete(FLAGS_KEY)
        return await self.load()

    async def patch(
        self, changes: Mapping[str, str], *, actor: str, reason: str | None
    ) -> tuple[FlagDefaults, FlagDefaults]:
        """Write ``changes`` and their audit entry in one transaction; (before, after)."""
        checked = validate_changes(changes)
        before = await self.load()
        after = parse_overrides(checked, before)
        entry = {
            "at": utc_now_iso(), "actor": actor, "action": "flags",
            "before": wire(before, checked), "after": wire(after, checked), "reason": reason,
        }  # fmt: skip
        async with store_errors("flags"), self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(FLAGS_KEY, mapping=dict(checked.items()))
            pipe.lpush(AUDIT_KEY, json.dumps(entry))
            pipe.ltrim(AUDIT_KEY, 0, AUDIT_MAX - 1)
            await pipe.execute()
        log.info("flags_patched", actor=actor, fields=sorted(checked))
        return before, await self.load()

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` audit entries (flag changes and rollout transitions)."""
        async with store_errors("audit"):
            raw: list[str] = await awaited(self._redis.lrange(AUDIT_KEY, 0, limit - 1))
        entries = []
        for item in raw:
            try:
                entries.append(json.loads(item))
            except ValueError:
                continue
        return entries


def wire(flags: FlagDefaults, fields: Iterable[str] = FIELDS) -> dict[str, object]:
    """``fields`` of ``flags`` by their API names (the views, an audit entry's before / after)."""
    described = describe(flags)
    return {WIRE_NAMES[name]: described[name] for name in fields}
