"""Exact percentiles over every sample (no averaging of percentiles, no bucketing).

A load test keeps at most a few hundred thousand latencies per metric, so sorting them is cheap and
gives exact order statistics; an HDR histogram would only add a resolution to explain. The
definition is *nearest rank*: p-th percentile of n sorted values is the ceil(p/100 * n)-th value.

Failed requests are never dropped from a distribution: a request that never reached a stage (no
first chunk, no completion) enters that stage's distribution as +infinity, the worst possible
latency. So 3 % failures make p99 infinite and p95 honest; ``censored`` says how many. In JSON
an infinite percentile is ``null`` (``n`` > 0 and ``censored`` > 0 tell it apart from "no data").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from loadtest.record import RequestRecord

__all__ = [
    "PERCENTILES",
    "distribution",
    "metric_values",
    "metrics",
    "percentile",
    "timeline",
]

PERCENTILES = (50, 90, 95, 99)
INF = math.inf


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values; ``None`` for no values."""
    if not sorted_values:
        return None
    rank = max(math.ceil(pct / 100.0 * len(sorted_values)), 1)
    return sorted_values[rank - 1]


def _json_number(value: float | None) -> float | None:
    if value is None or math.isinf(value):
        return None
    return round(value, 3)


def distribution(values: Iterable[float]) -> dict[str, Any]:
    """``{n, censored, p50, p90, p95, p99, max}`` of the values (ms); +inf counts as censored."""
    ordered = sorted(values)
    out: dict[str, Any] = {"n": len(ordered), "censored": sum(1 for v in ordered if v == INF)}
    for pct in PERCENTILES:
        out[f"p{pct}"] = _json_number(percentile(ordered, pct))
    out["max"] = _json_number(ordered[-1] if ordered else None)
    return out


def _ttft(record: RequestRecord) -> float:
    if record.ttft_ms is not None:
        return record.ttft_ms
    if record.ok and record.completion_ms is not None:  # an empty reply: the end is the first
        return record.completion_ms
    return INF


def _completion(record: RequestRecord) -> float:
    return record.completion_ms if record.ok and record.completion_ms is not None else INF


def _ack(record: RequestRecord) -> float:
    return record.ack_ms if record.ack_ms is not None else INF


def metric_values(records: Sequence[RequestRecord], name: str) -> list[float]:
    """The samples of one metric: ``ack``, ``ttft``, ``completion`` (failures as +inf), ``done``
    (finite only: the direct target has none) and ``gap`` (every inter-chunk gap)."""
    if name == "ttft":
        return [_ttft(r) for r in records]
    if name == "completion":
        return [_completion(r) for r in records]
    if name == "ack":
        return [_ack(r) for r in records]
    if name == "done":
        return [r.done_ms for r in records if r.done_ms is not None]
    if name == "gap":
        return [gap for r in records for gap in r.gaps_ms]
    raise ValueError(f"unknown metric {name!r}")


METRICS = ("ack", "ttft", "completion", "done", "gap")


def metrics(records: Sequence[RequestRecord]) -> dict[str, dict[str, Any]]:
    return {name: distribution(metric_values(records, name)) for name in METRICS}


def timeline(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """Per-window series for the report: arrivals, completions, failures, p95 TTFT.

    Arrivals and p95 TTFT are binned by scheduled time, completions and failures by the time the
    request ended. The window is 1 s, widened so a long run has at most 120 windows.
    """
    window_s = max(1.0, math.ceil(duration_s / 120.0))
    count = max(int(math.ceil(duration_s / window_s)), 1)
    arrivals = [0] * count
    completed = [0] * count
    failed = [0] * count
    ttfts: list[list[float]] = [[] for _ in range(count)]

    def slot(t_s: float) -> int:
        return min(max(int(t_s // window_s), 0), count - 1)

    for record in records:
        start = slot(record.scheduled_s)
        arrivals[start] += 1
        ttfts[start].append(_ttft(record))
        end = slot(record.end_s)
        if record.ok:
            completed[end] += 1
        else:
            failed[end] += 1
    p95 = [_json_number(percentile(sorted(v), 95)) for v in ttfts]
    return {
        "windowS": window_s,
        "startS": [i * window_s for i in range(count)],
        "arrivals": arrivals,
        "completed": completed,
        "failed": failed,
        "ttftP95Ms": p95,
    }
