"""The operators' side of the bridge's HTTP API (CONTRACT.md sections 4 and 5).

Bodies of ``PATCH /admin/flags`` and ``POST /admin/rollout/*`` and the views the routes answer
with. Types are strict (``"50"`` is not a percent, ``1`` is not a boolean): an operator's typo
is a 422 with the field's name, never a silently different rollout.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, field_validator

from contracts.base import Id, NonNegativeInt, WireModel

Percent = Annotated[float, Field(strict=True, ge=0.0, le=100.0, allow_inf_nan=False)]
StagePercent = Annotated[float, Field(strict=True, gt=0.0, le=100.0, allow_inf_nan=False)]
Seconds = Annotated[float, Field(strict=True, ge=0.0, le=7 * 86_400, allow_inf_nan=False)]
Reason = Annotated[str, Field(strict=True, max_length=500)]
MAX_LIST = 1000
MAX_STAGES = 10
DEFAULT_PLAN = (10.0, 25.0, 50.0, 100.0)


class RolloutState(StrEnum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    ROLLED_BACK = "rolled_back"


class Action(StrEnum):
    START = "start"
    PROMOTE = "promote"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"


class FlagsPatch(WireModel):
    """``PATCH /admin/flags``: any of the fields; the rest keep their values."""

    enabled: StrictBool | None = None
    percent: Percent | None = None
    allow_users: Annotated[list[Id], Field(max_length=MAX_LIST)] | None = None
    allow_roles: Annotated[list[Id], Field(max_length=MAX_LIST)] | None = None
    deny_users: Annotated[list[Id], Field(max_length=MAX_LIST)] | None = None
    fallback: StrictBool | None = None
    reason: Reason | None = None


class FlagsView(WireModel):
    enabled: bool
    percent: float
    allow_users: list[str]
    allow_roles: list[str]
    deny_users: list[str]
    fallback: bool
    defaults: dict[str, Any] | None = None  # the environment's values (what ``reset`` restores)


class RolloutStart(WireModel):
    """``POST /admin/rollout/start``."""

    plan: Annotated[list[StagePercent], Field(min_length=1, max_length=MAX_STAGES)] | None = None
    dwell_s: Seconds | None = None
    min_samples: Annotated[int, Field(strict=True, ge=1, le=10_000_000)] | None = None
    auto: StrictBool = False
    reason: Reason | None = None

    @field_validator("plan")
    @classmethod
    def _increasing(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("stages must increase (e.g. [10, 25, 50, 100])")
        return value


class Transition(WireModel):
    """``POST /admin/rollout/{promote|pause|resume|rollback}``."""

    reason: Reason | None = None
    force: StrictBool = False


class Gate(WireModel):
    name: str
    value: float | None  # None: no data (NaN, an empty query): never a pass
    threshold: float
    samples: NonNegativeInt
    verdict: Verdict
    detail: str | None = None


class BreakerReplica(WireModel):
    id: str
    state: Literal["closed", "open", "half_open"]


class BreakerView(WireModel):
    replicas: list[BreakerReplica] = Field(default_factory=list)


class RolloutView(WireModel):
    """``GET /admin/rollout``."""

    state: RolloutState
    stage: int  # index into ``plan``; -1 before the first start
    percent: float
    plan: list[float]
    stage_since: float | None  # epoch seconds
    dwell_s: float
    min_samples: int
    auto: bool
    gates: list[Gate]
    breaker: BreakerView
    history: list[dict[str, Any]]
    evaluated_at: float | None = None


class AuditEntry(WireModel):
    at: str  # ISO 8601, UTC
    actor: str
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    reason: str | None = None
    forced: bool = False
    gate: str | None = None  # the gate that failed, for an automatic rollback
