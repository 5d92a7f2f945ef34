"""Open-loop arrival schedules: stages with linear ramps, Poisson or constant arrivals.

The whole schedule is computed before the first request is sent (issue 4: "a precomputed arrival
schedule"), so how fast the system under test answers can never change when requests are sent:
that is what keeps the generator open-loop and free of coordinated omission.

A stage ``DURATION:RATE[:RAMP]`` holds ``RATE`` requests/s for ``DURATION``; its first ``RAMP``
seconds climb linearly from the previous stage's rate (0 before the first stage). Requests
scheduled inside a ramp are marked ``steady=False`` and left out of the stage's statistics.

Arrivals are placed by inverting the cumulative intensity Lambda(t) = integral of rate(t): the
k-th arrival is at Lambda^-1(k) for ``constant`` and at Lambda^-1(E1 + ... + Ek) with Ei ~ Exp(1)
for ``poisson`` (the time-rescaling theorem), which handles ramps exactly for both kinds.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "DEFAULT_RAMP_FRACTION",
    "DEFAULT_RAMP_MAX_S",
    "Arrival",
    "ArrivalKind",
    "Stage",
    "build_schedule",
    "parse_duration_s",
    "parse_stage",
]

# A stage without an explicit ramp climbs for a fifth of its length, at most 5 s.
DEFAULT_RAMP_FRACTION = 0.2
DEFAULT_RAMP_MAX_S = 5.0

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|m))?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ArrivalKind(StrEnum):
    POISSON = "poisson"
    CONSTANT = "constant"


@dataclass(frozen=True, kw_only=True)
class Stage:
    """Hold ``rate_per_s`` for ``duration_s``, the first ``ramp_s`` of it ramping up or down."""

    duration_s: float
    rate_per_s: float
    ramp_s: float

    def __post_init__(self) -> None:
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"stage duration must be > 0, got {self.duration_s}")
        if not (self.rate_per_s >= 0 and math.isfinite(self.rate_per_s)):
            raise ValueError(f"stage rate must be >= 0, got {self.rate_per_s}")
        if not 0 <= self.ramp_s <= self.duration_s:
            raise ValueError(f"ramp {self.ramp_s}s must be within the stage's {self.duration_s}s")

    @property
    def label(self) -> str:
        return f"{self.duration_s:g}s:{self.rate_per_s:g}/s:{self.ramp_s:g}s"


@dataclass(frozen=True, slots=True)
class Arrival:
    """One scheduled request: when (seconds after the run starts), in which stage, steady or not."""

    index: int
    offset_s: float
    stage: int
    steady: bool


def parse_duration_s(text: str) -> float:
    """``"30s"``, ``"1.5m"``, ``"250ms"``, ``"2h"``, or bare seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 30s, 2m, 500ms)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _parse_rate_per_s(text: str) -> float:
    match = _RATE_RE.match(text)
    if not match:
        raise ValueError(f"not a rate: {text!r} (try 50/s or 600/m)")
    return float(match.group(1)) / (60.0 if match.group(2) == "m" else 1.0)


def parse_stage(text: str, *, default_ramp_s: float | None = None) -> Stage:
    """Parse ``DURATION:RATE[:RAMP]``, e.g. ``30s:50/s`` or ``60s:200/s:10s``.

    Without a ramp, ``default_ramp_s`` applies (capped at the stage's duration) or, when that is
    ``None``, a fifth of the duration capped at 5 s.
    """
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"not a stage: {text!r} (DURATION:RATE[:RAMP], e.g. 30s:50/s)")
    duration_s = parse_duration_s(parts[0])
    rate_per_s = _parse_rate_per_s(parts[1])
    if len(parts) == 3:
        ramp_s = parse_duration_s(parts[2])
    elif default_ramp_s is not None:
        ramp_s = min(default_ramp_s, duration_s)
    else:
        ramp_s = min(DEFAULT_RAMP_MAX_S, duration_s * DEFAULT_RAMP_FRACTION)
    return Stage(duration_s=duration_s, rate_per_s=rate_per_s, ramp_s=ramp_s)


@dataclass(frozen=True, slots=True)
class _Segment:
    start_s: float
    duration_s: float
    rate0: float
    slope: float  # rate change per second
    stage: int
    steady: bool

    def mass(self) -> float:
        return self.rate0 * self.duration_s + 0.5 * self.slope * self.duration_s**2

    def time_for_mass(self, mass: float) -> float:
        # Solves rate0*dt + slope*dt^2/2 = mass in the cancellation-free form.
        root = math.sqrt(max(self.rate0**2 + 2.0 * self.slope * mass, 0.0))
        return self.start_s + 2.0 * mass / (self.rate0 + root)


def _segments(stages: Sequence[Stage]) -> Iterator[_Segment]:
    start_s, previous_rate = 0.0, 0.0
    for number, stage in enumerate(stages):
        if stage.ramp_s > 0:
            slope = (stage.rate_per_s - previous_rate) / stage.ramp_s
            yield _Segment(start_s, stage.ramp_s, previous_rate, slope, number, False)
        hold_s = stage.duration_s - stage.ramp_s
        if hold_s > 0:
            yield _Segment(start_s + stage.ramp_s, hold_s, stage.rate_per_s, 0.0, number, True)
        start_s += stage.duration_s
        previous_rate = stage.rate_per_s


def build_schedule(
    stages: Sequence[Stage],
    *,
    kind: ArrivalKind = ArrivalKind.POISSON,
    seed: int = 0,
    max_arrivals: int = 5_000_000,
) -> list[Arrival]:
    """Every arrival of the run, in time order; the same inputs always give the same schedule."""
    rng = random.Random(seed)

    def next_gap() -> float:
        return rng.expovariate(1.0) if kind is ArrivalKind.POISSON else 1.0

    arrivals: list[Arrival] = []
    pending = next_gap()  # intensity mass still to cover before the next arrival
    for segment in _segments(stages):
        used = 0.0
        total = segment.mass()
        while used + pending <= total:
            used += pending
            offset_s = segment.time_for_mass(used)
            arrivals.append(Arrival(len(arrivals), offset_s, segment.stage, segment.steady))
            if len(arrivals) > max_arrivals:
                raise ValueError(f"schedule exceeds {max_arrivals} arrivals")
            pending = next_gap()
        pending -= total - used
    return arrivals
