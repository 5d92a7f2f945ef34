"""Room state shared by the replicas, in Redis: owners, rate limits, presence, in-flight.

Keys (all under ``bridge:``):
- ``room:{roomId}:owner``     the user who first joined the room (CONTRACT.md "Rooms").
- ``room:{roomId}:members``   users the owner added (``add_member``); expires with the owner.
- ``room:{roomId}:online:{hostId}`` users with a socket in the room on that replica (presence);
  re-armed by its heartbeat, counted only while that replica's heartbeat lives.
- ``room:{roomId}:hosts``     set of replica host ids with local members of the room. A relay
  publishes its events through the Redis queue only while another live replica is in this set
  (ARCHITECTURE.md "Scale": local emits skip the queue).
- ``room:{roomId}:inflight``  hash requestId -> {userId, messageId, startedAt}: generations a
  joining socket must be replayed (from the backend's resume endpoint, on any replica).
- ``host:{hostId}``           heartbeat of a replica (expires when it dies).
- ``rate:{userId}:{window}``  fixed-window counter of send_message per user.

Every key expires, so Redis does not grow with the rooms ever used: an owner ``room_ttl_s`` after
the room's last join or send (refreshed by those, and by the heartbeat while members stay
connected here), a hosts set ``HOSTS_TTL_S`` after the last heartbeat of any replica in it, the
in-flight hash after the longest generation, a rate window after its end.

Every operation is one round trip (a pipeline or a script), none is on the per-chunk path, and
the owner and this replica's presence are cached: a message to a room this socket already uses
costs the rate limit and the in-flight record only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bridge.errors import store_errors
from contracts.aio import awaited

PREFIX = "bridge:"
HEARTBEAT_TTL_S = 15
HOSTS_TTL_S = 4 * HEARTBEAT_TTL_S  # re-armed by the heartbeats of a replica in the room
# A room's hosts / online keys are re-armed by the heartbeat once this old (a third of their TTL),
# not on every beat: at 5,000 rooms on a replica, re-arming all of them every 5 s was 15,000
# commands per beat, 8 % of the bridge's CPU (issue 8: cost that does not grow with users).
ROOM_REFRESH_S = HOSTS_TTL_S / 3
# Rooms per HEARTBEAT_SCRIPT call (Redis runs one call at a time: keep each short).
HEARTBEAT_BATCH = 1000
OWNER_REFRESH_MAX_S = 3600.0  # the heartbeat re-arms the owners of rooms in use at least this often
OWNER_CACHE_MAX = 100_000

# Claim the room for ARGV[1] unless owned. ARGV[1] may use it when it owns it, the owner added
# it (the members set), or its token's ``rooms`` claim admits the room (ARGV[5] == '1'); then
# record this host's presence and re-arm the keys' idle expiry (ARGV[3]: the owner's and the
# members', ARGV[4]: the hosts set's). Returns {owner, 1 | 0}.
# The heartbeat in one reply per batch of rooms (a pipeline of three commands per room parsed
# 3 replies per room, each under its own read timeout in redis-py: most of the heartbeat's CPU).
# KEYS[1]: this replica's liveness key, then per room its hosts set and this host's online set.
# ARGV: host id, liveness TTL, hosts TTL. Returns 1 when the liveness key existed before.
HEARTBEAT_SCRIPT = """
local was = redis.call('SET', KEYS[1], '1', 'EX', ARGV[2], 'GET')
for i = 2, #KEYS, 2 do
  redis.call('SADD', KEYS[i], ARGV[1])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
  redis.call('EXPIRE', KEYS[i + 1], ARGV[3])
end
if was then return 1 end
return 0
"""

JOIN_SCRIPT = """
local owner = redis.call('GET', KEYS[1])
if not owner then
  redis.call('SET', KEYS[1], ARGV[1])
  owner = ARGV[1]
end
local allowed = owner == ARGV[1] or ARGV[5] == '1'
  or redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1
if allowed then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {owner, allowed and 1 or 0}
"""

# The owner (ARGV[1]) adds ('add') or removes ('remove') ARGV[2]; ARGV[4] is the expiry. Returns
# the members after the change, or false when ARGV[1] does not own the room (or nobody does).
MEMBERS_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
if ARGV[3] == 'add' then
  redis.call('SADD', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
else
  redis.call('SREM', KEYS[2], ARGV[2])
end
return redis.call('SMEMBERS', KEYS[2])
"""


# Presence of ARGV[1] on host ARGV[2]: 'join' adds it to this host's online set (KEYS[2]),
# 'leave' removes it, 'list' changes nothing. Then, over this host and every live host of the
# room (KEYS[1], a host lives while ``host:{id}`` exists; ARGV[5] is that key's prefix and ARGV[4]
# the online sets' prefix): whether the user is online on another host, who is online, and
# whether another live host serves the room (only then does a presence event need the queue).
# Atomic, so two replicas joining (or leaving) one user at once announce it once.
PRESENCE_SCRIPT = """
if ARGV[3] == 'join' then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
elseif ARGV[3] == 'leave' then
  redis.call('SREM', KEYS[2], ARGV[1])
end
local online, others, remote = {}, 0, 0
for _, u in ipairs(redis.call('SMEMBERS', KEYS[2])) do online[u] = true end
for _, h in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if h ~= ARGV[2] and redis.call('EXISTS', ARGV[5] .. h) == 1 then
    remote = 1
    local set = ARGV[4] .. h
    for _, u in ipairs(redis.call('SMEMBERS', set)) do online[u] = true end
    if redis.call('SISMEMBER', set, ARGV[1]) == 1 then others = 1 end
  end
end
local users = {}
for u, _ in pairs(online) do users[#users + 1] = u end
return {others, users, remote}
"""


@dataclass(frozen=True, slots=True)
class Presence:
    elsewhere: bool  # the user is online in the room on another replica
    online: list[str]  # every user online in the room, on every live replica
    remote: bool  # another live replica serves the room (a presence event must be published)


@dataclass(frozen=True, slots=True)
class InFlight:
    request_id: str
    user_id: str
    message_id: str
    started_at: float


class RoomRegistry:
    """Owners, presence, in-flight generations and rate limits of the rooms."""

    def __init__(
        self,
        redis: Redis,
        *,
        host_id: str,
        inflight_ttl_s: int,
        rate_limit: int,
        rate_window_s: int,
        room_ttl_s: int,
    ) -> None:
        self._redis = redis
        self.host_id = host_id
        self._inflight_ttl_s = inflight_ttl_s
        self._rate_limit = rate_limit
        self._rate_window_s = rate_window_s
        self._room_ttl_s = room_ttl_s
        self._owner_refresh_s = min(OWNER_REFRESH_MAX_S, room_ttl_s / 4)
        self._owners_refreshed_at = time.monotonic()
        self._owners: dict[str, str] = {}  # owners never change: cached, bounded
        # rooms whose hosts set holds this replica -> when the heartbeat last re-armed them
        self._present: dict[str, float] = {}
        self._join = redis.register_script(JOIN_SCRIPT)
        self._members = redis.register_script(MEMBERS_SCRIPT)
        self._presence = redis.register_script(PRESENCE_SCRIPT)
        self._beat = redis.register_script(HEARTBEAT_SCRIPT)

    # ---- ownership and rate limit ---------------------------------------------------------

    async def join(self, room_id: str, user_id: str, *, granted: bool = False) -> bool:
        """Whether ``user_id`` may use the room: the first user to ask becomes its owner; others
        when the owner added them or ``granted`` (their token's ``rooms`` claim admits it).
        When it may, this replica is recorded as having members of the room. The owner's answer
        is cached (owners never change); anyone else's is asked every time (one round trip), so
        a removal holds at once on every replica."""
        if self._owners.get(room_id) == user_id and room_id in self._present:
            return True
        keys = [
            f"{PREFIX}room:{room_id}:owner",
            f"{PREFIX}room:{room_id}:hosts",
            f"{PREFIX}room:{room_id}:members",
        ]
        args: list[str | int] = [
            user_id, self.host_id, self._room_ttl_s, HOSTS_TTL_S, "1" if granted else "0"
        ]  # fmt: skip
        async with store_errors("join room"):
            owner, allowed = await self._join(keys=keys, args=args)
        owner = str(owner)
        if len(self._owners) >= OWNER_CACHE_MAX:
            self._owners.clear()
        self._owners[room_id] = owner
        if allowed:
            self._present[room_id] = time.monotonic()  # the script just armed its keys
        return bool(allowed)

    async def presence(self, room_id: str, user_id: str, op: str) -> Presence:
        """``op`` 'join' / 'leave' / 'list' for this replica, then the room's presence."""
        room = f"{PREFIX}room:{room_id}"
        keys = [f"{room}:hosts", f"{room}:online:{self.host_id}"]
        args: list[str | int] = [
            user_id, self.host_id, op, f"{room}:online:", f"{PREFIX}host:", HOSTS_TTL_S
        ]  # fmt: skip
        async with store_errors("presence"):
            others, users, remote = await self._presence(keys=keys, args=args)
        return Presence(bool(others), sorted(str(u) for u in users), bool(remote))

    async def may_read(self, room_id: str, user_id: str, *, granted: bool = False) -> bool | None:
        """Whether ``user_id`` may read the room (owner, added member, or ``granted``), without
        claiming it; None when nobody owns it."""
        async with store_errors("read room"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(f"{PREFIX}room:{room_id}:owner")
                pipe.sismember(f"{PREFIX}room:{room_id}:members", user_id)
                owner, member = await pipe.execute()
        if owner is None:
            return None
        return owner == user_id or granted or bool(member)

    async def change_member(
        self, room_id: str, owner_id: str, member_id: str, *, add: bool
    ) -> list[str] | None:
        """Add or remove ``member_id``; the members after it, or None unless ``owner_id`` owns
        the room."""
        keys = [f"{PREFIX}room:{room_id}:owner", f"{PREFIX}room:{room_id}:members"]
        args = [owner_id, member_id, "add" if add else "remove", self._room_ttl_s]
        async with store_errors("change member"):
            members = await self._members(keys=keys, args=args)
        if members is None:
            return None
        return sorted(str(m) for m in members)

    async def member_count(self, room_id: str) -> int:
        async with store_errors("count members"):
            return int(await awaited(self._redis.scard(f"{PREFIX}room:{room_id}:members")))

    async def rate_limited(self, user_id: str) -> int | None:
        """Fixed-window rate limit per user, shared by every replica: None when this message
        may go, else the ms until the window ends (the rejection's ``retryAfterMs``)."""
        if self._rate_limit <= 0:
            return None
        now = time.time()
        window = int(now // self._rate_window_s)
        key = f"{PREFIX}rate:{user_id}:{window}"
        async with store_errors("rate limit"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, self._rate_window_s + 1)
            count, _ = await pipe.execute()
        if int(count) <= self._rate_limit:
            return None
        return max(1, math.ceil(((window + 1) * self._rate_window_s - now) * 1000))

    # ---- presence -------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """Refresh this replica's liveness and re-assert its presence in the rooms it serves
        (another replica drops a host from a room whose heartbeat it saw expire), re-arming the
        hosts sets' expiry: each room once ``ROOM_REFRESH_S`` old, and every room at once when
        this replica's liveness key was gone (it was given up for dead, or Redis is a new,
        empty server); every ``_owner_refresh_s`` also the owners' (a room in use never loses
        its owner, however long its members stay without sending)."""
        now = time.monotonic()
        owners = now - self._owners_refreshed_at >= self._owner_refresh_s
        due = [r for r, at in self._present.items() if owners or now - at >= ROOM_REFRESH_S]
        async with store_errors("heartbeat"):
            was_alive = await self._rearm(due)
            if not was_alive and len(due) < len(self._present):
                chosen = set(due)
                rest = [r for r in self._present if r not in chosen]
                await self._rearm(rest)
                due += rest
            if owners and due:
                pipe = self._redis.pipeline(transaction=False)
                for room_id in due:
                    pipe.expire(f"{PREFIX}room:{room_id}:owner", self._room_ttl_s)
                await pipe.execute()
        for room_id in due:
            if room_id in self._present:
                self._present[room_id] = now
        if owners:
            self._owners_refreshed_at = now

    async def _rearm(self, rooms: list[str]) -> bool:
        """Refresh the liveness key and re-arm ``rooms``' keys; whether the key was alive."""
        host = f"{PREFIX}host:{self.host_id}"
        args: list[str | int] = [self.host_id, HEARTBEAT_TTL_S, HOSTS_TTL_S]
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, max(len(rooms), 1), HEARTBEAT_BATCH):
            keys = [host]
            for room_id in rooms[start : start + HEARTBEAT_BATCH]:
                room = f"{PREFIX}room:{room_id}"
                keys += [f"{room}:hosts", f"{room}:online:{self.host_id}"]
            await self._beat(keys=keys, args=args, client=pipe)
        first, *_ = await pipe.execute()
        return bool(first)

    async def retire(self, rooms: list[str]) -> None:
        async with store_errors("retire"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(f"{PREFIX}host:{self.host_id}")
            for room_id in rooms:
                pipe.srem(f"{PREFIX}room:{room_id}:hosts", self.host_id)
                pipe.delete(f"{PREFIX}room:{room_id}:online:{self.host_id}")
            await pipe.execute()

    async def absent(self, room_id: str) -> None:
        self._present.pop(room_id, None)
        async with store_errors("presence"):
            await awaited(self._redis.srem(f"{PREFIX}room:{room_id}:hosts", self.host_id))

    async def present(self, room_id: str) -> None:
        """Record this replica in the room's hosts set again (see ``ChatHandlers._absent``)."""
        hosts = f"{PREFIX}room:{room_id}:hosts"
        async with store_errors("presence"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.sadd(hosts, self.host_id)
            pipe.expire(hosts, HOSTS_TTL_S)
            await pipe.execute()
        self._present[room_id] = time.monotonic()

    async def has_remote_members(self, room_id: str) -> bool:
        async with store_errors("presence"):
            hosts = await awaited(self._redis.smembers(f"{PREFIX}room:{room_id}:hosts"))
            return await self._any_alive(room_id, hosts)

    async def _any_alive(self, room_id: str, hosts: Any) -> bool:
        others = [h for h in hosts if h != self.host_id]
        if not others:
            return False
        alive = await self._redis.mget([f"{PREFIX}host:{h}" for h in others])
        dead = [h for h, beat in zip(others, alive, strict=True) if beat is None]
        if dead:
            await awaited(self._redis.srem(f"{PREFIX}room:{room_id}:hosts", *dead))
        return len(dead) < len(others)

    # ---- in-flight generations ------------------------------------------------------------

    async def begin(self, room_id: str, request_id: str, user_id: str, message_id: str) -> bool:
        """Record a generation in flight; return whether other replicas have room members."""
        key = f"{PREFIX}room:{room_id}:inflight"
        record = json.dumps({"userId": user_id, "messageId": message_id, "startedAt": time.time()})
        async with store_errors("begin"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, request_id, record)
            pipe.expire(key, self._inflight_ttl_s)
            pipe.expire(f"{PREFIX}room:{room_id}:owner", self._room_ttl_s)
            pipe.smembers(f"{PREFIX}room:{room_id}:hosts")
            *_, hosts = await pipe.execute()
            return await self._any_alive(room_id, hosts)

    async def finish(self, room_id: str, request_id: str) -> None:
        async with store_errors("finish"):
            await awaited(self._redis.hdel(f"{PREFIX}room:{room_id}:inflight", request_id))

    async def in_flight(self, room_id: str) -> list[InFlight]:
        async with store_errors("in flight"):
            raw = await awaited(self._redis.hgetall(f"{PREFIX}room:{room_id}:inflight"))
        oldest = time.time() - self._inflight_ttl_s
        found = []
        for request_id, value in raw.items():
            try:
                rec = json.loads(value)
                item = InFlight(request_id, rec["userId"], rec["messageId"], rec["startedAt"])
            except (ValueError, KeyError, TypeError):
                continue
            if item.started_at >= oldest:
                found.append(item)
        return sorted(found, key=lambda item: item.started_at)
