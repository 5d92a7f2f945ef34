from __future__ import annotations

import math

import pytest

from loadtest.schedule import ArrivalKind, Stage, build_schedule, parse_duration_s, parse_stage


def test_parse_stage_reads_duration_rate_and_explicit_ramp() -> None:
    assert parse_stage("60s:200/s:10s") == Stage(duration_s=60, rate_per_s=200, ramp_s=10)
    assert parse_stage("2m:600/m:0s") == Stage(duration_s=120, rate_per_s=10, ramp_s=0)


def test_parse_stage_defaults_ramp_to_a_fifth_capped_at_5s() -> None:
    assert parse_stage("10s:5/s").ramp_s == 2.0
    assert parse_stage("60s:5/s").ramp_s == 5.0
    assert parse_stage("10s:5/s", default_ramp_s=30).ramp_s == 10.0


@pytest.mark.parametrize("bad", ["30s", "x:5/s", "30s:fast", "1:2:3:4", "30s:5/s:40s"])
def test_parse_stage_rejects_malformed_specs(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_stage(bad)


def test_parse_duration_accepts_units() -> None:
    assert parse_duration_s("250ms") == 0.25
    assert parse_duration_s("1.5m") == 90.0
    assert parse_duration_s("3") == 3.0


def test_constant_schedule_is_evenly_spaced_at_the_rate() -> None:
    stages = [Stage(duration_s=10, rate_per_s=4, ramp_s=0)]
    arrivals = build_schedule(stages, kind=ArrivalKind.CONSTANT)
    assert len(arrivals) == 40
    gaps = {round(b.offset_s - a.offset_s, 9) for a, b in zip(arrivals, arrivals[1:], strict=False)}
    assert gaps == {0.25}
    assert all(a.steady and a.stage == 0 for a in arrivals)


def test_poisson_schedule_count_matches_rate_within_four_sigma() -> None:
    arrivals = build_schedule([Stage(duration_s=100, rate_per_s=50, ramp_s=0)], seed=7)
    expected = 5000
    assert abs(len(arrivals) - expected) < 4 * math.sqrt(expected)
    gaps = [b.offset_s - a.offset_s for a, b in zip(arrivals, arrivals[1:], strict=False)]
    mean_gap = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean_gap) ** 2 for g in gaps) / len(gaps)) / mean_gap
    assert 0.9 < cv < 1.1  # exponential gaps: coefficient of variation 1


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    stages = [Stage(duration_s=5, rate_per_s=20, ramp_s=1)]
    assert build_schedule(stages, seed=3) == build_schedule(stages, seed=3)
    assert build_schedule(stages, seed=3) != build_schedule(stages, seed=4)


def test_ramp_arrivals_are_not_steady_and_follow_the_linear_rate() -> None:
    stages = [
        Stage(duration_s=10, rate_per_s=10, ramp_s=0),
        Stage(duration_s=20, rate_per_s=30, ramp_s=10),
    ]
    arrivals = build_schedule(stages, kind=ArrivalKind.CONSTANT)
    ramp = [a for a in arrivals if a.stage == 1 and not a.steady]
    hold = [a for a in arrivals if a.stage == 1 and a.steady]
    assert all(10 <= a.offset_s <= 20 for a in ramp)
    assert all(20 <= a.offset_s <= 30 for a in hold)
    assert len(ramp) == pytest.approx(200, abs=1)  # mean rate 20/s over 10 s
    assert len(hold) == pytest.approx(300, abs=1)
    first_half = sum(1 for a in ramp if a.offset_s < 15)
    assert first_half == pytest.approx(75, abs=1)  # integral of 10 + 2t over 5 s


def test_zero_rate_stage_schedules_nothing() -> None:
    assert build_schedule([Stage(duration_s=5, rate_per_s=0, ramp_s=0)]) == []
