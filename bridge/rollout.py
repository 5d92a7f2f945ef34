"""Staged rollout of the stream path (CONTRACT.md section 5): state, transitions, audit, controller.

The state lives in Redis (``bridge:rollout``, one JSON document with a ``version``), so every
replica sees the same rollout and a restarted one resumes where it was. A transition is computed
from the state it read and applied by one script that checks the version (compare-and-set),
writes the new state, the flags every replica obeys (``bridge:flags``, bridge/flags.py) and the
audit entry together: two replicas (or an operator and the controller) acting on the same state
make one transition, never two, and no flag change goes unaudited.

    idle/done/rolled_back --start--> running --promote--> running (next stage) ... --> done
    running --pause--> paused --resume--> running;  running/paused --rollback--> rolled_back

The first stage streams the allow lists (roles ``internal`` and ``admin`` are added to
``allow_roles``) plus the plan's first percentage; a rollback returns to the previous stage's
percentage (0 from the first, and ``allow_roles`` as it was before the start). Promoting into
the last stage ends the rollout (``done``): it
was judged on the stage before, and at 100 % no complete cohort is left to compare with.

The controller runs in every replica; the one holding the lease (``bridge:rollout:lease``, a
``SET NX PX`` renewed by its holder) judges the running stage every ``BRIDGE_ROLLOUT_EVAL_S``
(bridge/gates.py). With ``auto`` it promotes a stage whose gates all pass and rolls back at once
on a failing gate, naming it in the audit trail. A dead holder's lease expires and another
replica takes over; the version check keeps a late old holder from promoting twice.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.errors import StoreError, store_errors
from bridge.flags import AUDIT_KEY, AUDIT_MAX, FLAGS_KEY, FlagStore, wire
from bridge.gates import Prometheus, Window, blocking, failing, judge
from bridge.settings import RolloutSettings
from contracts import utc_now_iso
from contracts.admin import DEFAULT_PLAN, Action, Gate, RolloutStart, RolloutState
from contracts.aio import awaited

log = structlog.get_logger("bridge.rollout")

ROLLOUT_KEY = "bridge:rollout"
LEASE_KEY = "bridge:rollout:lease"
HISTORY_MAX = 50
FIRST_STAGE_ROLES = ("internal", "admin")
LEASE_PERIODS = 3  # the lease outlives three missed evaluations
GATES_CACHE_S = 1.0  # GET /admin/rollout on a busy page asks Prometheus at most once a second

# KEYS: rollout, audit, flags. ARGV: expected version, new state, audit entry, audit cap,
# then flag field/value pairs. 1 when applied, 0 when the state changed meanwhile.
APPLY_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
local version = 0
if cur then version = tonumber(cjson.decode(cur)['version']) or 0 end
if version ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
return 1
"""
# KEYS: lease. ARGV: holder, ttl ms. 1 when the caller holds the lease afterwards.
LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# KEYS: lease. ARGV: holder. Drops the lease only if the caller still holds it.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class TransitionError(Exception):
    """A transition the state does not allow now (HTTP 409)."""

    def __init__(self, message: str, gates: list[Gate] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.gates = gates or []


@dataclass(frozen=True, slots=True)
class Rollout:
    state: RolloutState = RolloutState.IDLE
    stage: int = -1
    percent: float = 0.0
    plan: tuple[float, ...] = DEFAULT_PLAN
    dwell_s: float = 600.0
    min_samples: int = 200
    auto: bool = False
    stage_since: float | None = None
    history: tuple[dict[str, Any], ...] = ()
    version: int = 0
    roles_before: tuple[str, ...] | None = None  # allow_roles before start (a full rollback)

    def to_json(self) -> str:
        raw = asdict(self)
        raw["state"] = self.state.value
        raw["plan"] = list(self.plan)
        raw["history"] = list(self.history)
        raw["roles_before"] = None if self.roles_before is None else list(self.roles_before)
        return json.dumps(raw, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | None) -> Rollout:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(
            state=RolloutState(data["state"]),
            stage=int(data["stage"]),
            percent=float(data["percent"]),
            plan=tuple(float(p) for p in data["plan"]),
            dwell_s=float(data["dwell_s"]),
            min_samples=int(data["min_samples"]),
            auto=bool(data["auto"]),
            stage_since=None if data.get("stage_since") is None else float(data["stage_since"]),
            history=tuple(data.get("history", ())),
            version=int(data["version"]),
            roles_before=(
                None if data.get("roles_before") is None else tuple(data["roles_before"])
            ),
        )

    def summary(self) -> dict[str, Any]:
        return {"state": self.state.value, "stage": self.stage, "percent": self.percent}

    def window(self) -> Window | None:
        if self.state is not RolloutState.RUNNING or self.stage_since is None:
            return None
        return Window(since=self.stage_since, dwell_s=self.dwell_s, min_samples=self.min_samples)


@dataclass(frozen=True, slots=True)
class Change:
    """A transition's result: the new state, the flag fields it sets, its audit entry."""

    after: Rollout
    flags: dict[str, str] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)


def plan_transition(
    current: Rollout, action: Action, *, actor: str, reason: str | None, now: float,
    start: RolloutStart | None = None, settings: RolloutSettings | None = None,
    forced: bool = False, gate: str | None = None, flags_roles: frozenset[str] = frozenset(),
) -> Change:  # fmt: skip
    """The state after ``action`` (pure: no I/O); raises ``TransitionError`` when not allowed."""
    s = current.state
    flags: dict[str, str] = {}
    if action is Action.START:
        if s in (RolloutState.RUNNING, RolloutState.PAUSED):
            raise TransitionError(f"start: a rollout is {s.value}; roll it back or finish it")
        assert start is not None and settings is not None
        plan = tuple(start.plan) if start.plan else DEFAULT_PLAN
        after = Rollout(
            state=RolloutState.RUNNING, stage=0, percent=plan[0], plan=plan,
            dwell_s=settings.dwell_s if start.dwell_s is None else start.dwell_s,
            min_samples=settings.min_samples if start.min_samples is None else start.min_samples,
            auto=start.auto, stage_since=now, history=current.history, version=current.version,
            roles_before=tuple(sorted(flags_roles)),
        )  # fmt: skip
        roles = sorted(flags_roles | set(FIRST_STAGE_ROLES))
        flags = {"enabled": "true", "percent": _fmt(plan[0]), "allow_roles": ",".join(roles)}
    elif action is Action.PROMOTE:
        if s is not RolloutState.RUNNING:
            raise TransitionError(f"promote: the rollout is {s.value}, not running")
        nxt = current.stage + 1
        # the last stage is the goal, not a stage to judge: at 100 % no complete cohort is
        # left to compare with; promoting into it ends the rollout (Flagger's finalisation)
        done = nxt >= len(current.plan) - 1
        nxt = min(nxt, len(current.plan) - 1)  # a one-stage plan: promoting it ends it
        after = replace(
            current, stage=nxt, percent=current.plan[nxt], stage_since=now,
            state=RolloutState.DONE if done else RolloutState.RUNNING,
        )  # fmt: skip
        flags = {"percent": _fmt(after.percent)}
    elif action is Action.PAUSE:
        if s is not RolloutState.RUNNING:
            raise TransitionError(f"pause: the rollout is {s.value}, not running")
        after = replace(current, state=RolloutState.PAUSED)
    elif action is Action.RESUME:
        if s is not RolloutState.PAUSED:
            raise TransitionError(f"resume: the rollout is {s.value}, not paused")
        # a fresh window: what happened while paused was not judged
        after = replace(current, state=RolloutState.RUNNING, stage_since=now)
    elif action is Action.ROLLBACK:
        if s not in (RolloutState.RUNNING, RolloutState.PAUSED):
            raise TransitionError(f"rollback: the rollout is {s.value}, not running or paused")
        back = current.plan[current.stage - 1] if current.stage > 0 else 0.0
        after = replace(current, state=RolloutState.ROLLED_BACK, percent=back, stage_since=now)
        flags = {"percent": _fmt(back)}
        if current.stage == 0 and current.roles_before is not None:
            # back before the first stage: the roles it added stream no more either
            flags["allow_roles"] = ",".join(current.roles_before)
    else:  # pragma: no cover - Action is closed
        raise TransitionError(f"unknown action {action}")
    entry: dict[str, Any] = {
        "at": utc_now_iso(), "actor": actor, "action": action.value,
        "before": current.summary(), "after": after.summary(), "reason": reason,
    }  # fmt: skip
    if forced:
        entry["forced"] = True
    if gate is not None:
        entry["gate"] = gate
    step = {**entry, "at_s": round(now, 3)}
    history = (*after.history, step)[-HISTORY_MAX:]
    after = replace(after, history=history, version=current.version + 1)
    return Change(after=after, flags=flags, entry=entry)


def _fmt(percent: float) -> str:
    return f"{percent:g}"


class RolloutStore:
    """The rollout document in Redis and its audited, compare-and-set transitions."""

    def __init__(self, redis: Redis, flags: FlagStore, settings: RolloutSettings) -> None:
        self._redis = redis
        self._flags = flags
        self.settings = settings
        self._apply = redis.register_script(APPLY_SCRIPT)

    async def load(self) -> Rollout:
        async with store_errors("rollout"):
            raw = await awaited(self._redis.get(ROLLOUT_KEY))
        try:
            return Rollout.from_json(raw)
        except (ValueError, KeyError, TypeError):
            log.error("rollout_state_unreadable")
            raise StoreError("rollout: state unreadable") from None

    async def transition(
        self, action: Action, *, actor: str, reason: str | None,
        start: RolloutStart | None = None, forced: bool = False, gate: str | None = None,
        expect: Rollout | None = None,
    ) -> Rollout:  # fmt: skip
        """Apply ``action`` to the current state (or to ``expect``, which must still be current:
        the controller's judgement holds only for the state it judged)."""
        current = expect if expect is not None else await self.load()
        change = plan_transition(
            current, action, actor=actor, reason=reason, now=time.time(), start=start,
            settings=self.settings, forced=forced, gate=gate,
            flags_roles=self._flags.current.allow_roles,
        )  # fmt: skip
        args: list[str | int] = [current.version, change.after.to_json(), json.dumps(change.entry)]
        args.append(AUDIT_MAX)
        for name, value in change.flags.items():
            args += [name, value]
        async with store_errors("rollout"):
            applied = await self._apply(keys=[ROLLOUT_KEY, AUDIT_KEY, FLAGS_KEY], args=args)
        if not applied:
            raise TransitionError(f"{action.value}: the rollout changed meanwhile, look again")
        log.info(
            "rollout_transition", action=action.value, actor=actor, forced=forced, gate=gate,
            before=current.summary(), after=change.after.summary(),
        )  # fmt: skip
        if change.flags:
            await self._flags.load()  # this replica obeys at once; the others within 1 s
        return change.after


class Controller:
    """The lease holder's loop: judge the running stage, promote or roll back under ``auto``."""

    def __init__(
        self, store: RolloutStore, prometheus: Prometheus, *, replica_id: str,
        redis: Redis,
    ) -> None:  # fmt: skip
        self.store = store
        self.prometheus = prometheus
        self.replica_id = replica_id
        self.actor = f"controller:{replica_id}"
        self._redis = redis
        self._lease = redis.register_script(LEASE_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)
        self._token = f"{replica_id}:{uuid.uuid4().hex[:8]}"
        self.holds_lease = False
        self._cache: tuple[float, int, list[Gate]] | None = None
        self.last_evaluated: float | None = None

    @property
    def eval_s(self) -> float:
        return self.store.settings.eval_s

    async def gates(self, rollout: Rollout) -> list[Gate]:
        """The current stage's gates (cached for a second per state version)."""
        window = rollout.window()
        if window is None:
            return []
        now = time.monotonic()
        if self._cache is not None:
            at, version, gates = self._cache
            if version == rollout.version and now - at < GATES_CACHE_S:
                return gates
        gates = await judge(self.prometheus, window)
        self._cache = (now, rollout.version, gates)
        return gates

    async def _hold_lease(self) -> bool:
        ttl_ms = int(self.eval_s * LEASE_PERIODS * 1000) + 1000
        try:
            held = bool(await self._lease(keys=[LEASE_KEY], args=[self._token, ttl_ms]))
        except (RedisError, OSError):
            held = False
        if held != self.holds_lease:
            log.info("rollout_lease", held=held, replica=self.replica_id)
        self.holds_lease = held
        return held

    async def evaluate_once(self) -> Rollout | None:
        """One judgement of the running stage; the transition made, if any."""
        rollout = await self.store.load()
        if rollout.state is not RolloutState.RUNNING:
            return None
        self._cache = None
        gates = await self.gates(rollout)
        self.last_evaluated = time.time()
        if not rollout.auto:
            return None
        failed = failing(gates)
        try:
            if failed:
                gate = failed[0]
                reason = f"gate {gate.name} failed: {gate.value} vs {gate.threshold}" + (
                    f" ({gate.detail})" if gate.detail else ""
                )
                return await self.store.transition(
                    Action.ROLLBACK, actor=self.actor, reason=reason, gate=gate.name,
                    expect=rollout,
                )  # fmt: skip
            if not blocking(gates):
                return await self.store.transition(
                    Action.PROMOTE, actor=self.actor, reason="every gate passed", expect=rollout
                )
        except TransitionError:
            log.info("rollout_changed_meanwhile")  # an operator (or another replica) was first
        return None

    async def run_forever(self) -> None:
        while True:
            try:
                if await self._hold_lease():
                    await self.evaluate_once()
            except StoreError:
                log.warning("rollout_evaluation_failed")
            except Exception:
                log.exception("rollout_evaluation_crashed")
            await asyncio.sleep(self.eval_s)

    async def release(self) -> None:
        """Give the lease up at shutdown so another replica takes over without waiting."""
        if not self.holds_lease:
            return
        try:
            await self._release(keys=[LEASE_KEY], args=[self._token])
        except (RedisError, OSError):
            pass
        self.holds_lease = False


def flags_view(store: FlagStore) -> dict[str, Any]:
    return {**wire(store.current), "defaults": wire(store.defaults)}
