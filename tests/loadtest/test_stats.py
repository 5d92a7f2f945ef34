from __future__ import annotations

import math

from loadtest.record import RequestRecord
from loadtest.stats import distribution, metric_values, percentile, timeline


def _record(index: int, **fields: object) -> RequestRecord:
    base: dict[str, object] = dict(
        target="bridge",
        index=index,
        request_id=f"r{index}",
        user=0,
        stage=0,
        steady=True,
        scheduled_s=float(index),
    )
    base.update(fields)
    return RequestRecord(**base)  # type: ignore[arg-type]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert percentile([7.0], 1) == 7.0
    assert percentile([], 50) is None


def test_distribution_counts_infinite_values_as_censored_and_nulls_them() -> None:
    dist = distribution([10.0] * 97 + [math.inf] * 3)
    assert dist["n"] == 100 and dist["censored"] == 3
    assert dist["p95"] == 10.0
    assert dist["p99"] is None and dist["max"] is None


def test_failed_requests_enter_ttft_and_completion_as_infinite() -> None:
    records = [
        _record(0, ttft_ms=100.0, completion_ms=500.0),
        _record(1, ttft_ms=120.0, failure="stall"),
        _record(2, failure="ack_timeout"),
    ]
    assert metric_values(records, "ttft") == [100.0, 120.0, math.inf]
    assert metric_values(records, "completion") == [500.0, math.inf, math.inf]


def test_empty_reply_uses_completion_as_ttft() -> None:
    assert metric_values([_record(0, completion_ms=80.0)], "ttft") == [80.0]


def test_timeline_bins_arrivals_by_schedule_and_outcomes_by_end() -> None:
    records = [
        _record(0, scheduled_s=0.2, ttft_ms=50.0, completion_ms=1500.0),
        _record(1, scheduled_s=0.4, failure="timeout", sent_ms=1.0),
        _record(2, scheduled_s=2.5, ttft_ms=30.0, completion_ms=100.0),
    ]
    tl = timeline(records, 3.0)
    assert tl["windowS"] == 1.0
    assert tl["arrivals"] == [2, 0, 1]
    assert tl["completed"] == [0, 1, 1]
    assert tl["failed"] == [1, 0, 0]
    assert tl["ttftP95Ms"] == [None, None, 30.0]
