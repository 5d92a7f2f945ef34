"""A rollout stage's gates, judged on Prometheus (CONTRACT.md section 5), as Flagger does.

Every replica exports the same series (section 6); the gates read their sums over the stage's
window ``[stageSince, now]``, split by cohort: the *stream* cohort is every request whose flags
said stream (``path`` ``stream`` or ``fallback``), the *complete* cohort the rest.

| gate | value | passes when |
| --- | --- | --- |
| ``dwell`` | seconds in the stage | ``>= dwellS`` |
| ``p95_ttft`` | stream p95 TTFT, s | ``<= 1.5`` |
| ``p95_ttft_vs_complete`` | stream p95 TTFT / complete p95 TTFT | ``<= 1.10`` |
| ``p95_completion`` | stream p95 completion, s | ``<= 8`` |
| ``failed_sends`` | (failed + acks later than 10 s) / finished, stream cohort | ``<= 0.01`` |
| ``relay_faults`` | unrepaired seq gaps + content that differed from its chunks | ``= 0`` |
| ``breaker`` | any replica's breaker open in the window (0/1) | ``= 0`` |

No data (an empty vector, NaN: Prometheus unreachable, no scrape yet, no traffic) is ``wait``,
never ``pass`` (the trap Flagger's users keep reporting). A gate passes only with at least
``minSamples`` finished requests in its cohort; it *fails* already with a tenth of them (a
rollout is rolled back on the first clear evidence, promoted only on enough of it). Faults and
an open breaker fail at once: one is already evidence.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import httpx
import structlog

from contracts.admin import Gate, Verdict

log = structlog.get_logger("bridge.gates")

QUERY_TIMEOUT_S = 5.0
STREAM = 'path=~"stream|fallback"'
COMPLETE = 'path="complete"'
P95_TTFT_S = 1.5
TTFT_VS_COMPLETE = 1.10
P95_COMPLETION_S = 8.0
FAILED_RATIO = 0.01
LATE_ACK_LE = "10.0"  # a bucket bound of bridge_ack_seconds (bridge/metrics.py)
FAULT_KINDS = "gap_unrepaired|content_mismatch"  # bridge_relay_faults_total kinds the gate counts
GATE_NAMES = (
    "dwell", "p95_ttft", "p95_ttft_vs_complete", "p95_completion", "failed_sends",
    "relay_faults", "breaker",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Window:
    """The stage being judged: since when, how long it must dwell, how many samples it needs."""

    since: float  # epoch seconds
    dwell_s: float
    min_samples: int

    @property
    def fail_samples(self) -> int:
        return max(1, math.ceil(self.min_samples / 10))


def _p95(selector: str, window: str, metric: str) -> str:
    return (
        f"histogram_quantile(0.95, sum by (le) "
        f"(increase(bridge_{metric}_seconds_bucket{{{selector}}}[{window}])))"
    )


def queries(window: str) -> dict[str, str]:
    """The PromQL of every number the gates use, over ``window`` (e.g. ``"42s"``)."""
    w = window
    return {
        "stream_samples": f"sum(increase(bridge_requests_total{{{STREAM}}}[{w}]))",
        "complete_samples": f"sum(increase(bridge_requests_total{{{COMPLETE}}}[{w}]))",
        # ``or vector(0)``: a counter without a series yet counted nothing (still NaN when
        # Prometheus itself does not answer)
        "stream_failed": (
            f'sum(increase(bridge_requests_total{{{STREAM},ok="false"}}[{w}])) or vector(0)'
        ),
        "stream_acks": f"sum(increase(bridge_ack_seconds_count{{{STREAM}}}[{w}])) or vector(0)",
        "stream_acks_in_time": (
            f'sum(increase(bridge_ack_seconds_bucket{{{STREAM},le="{LATE_ACK_LE}"}}[{w}]))'
            " or vector(0)"
        ),
        "stream_ttft_p95": _p95(STREAM, w, "ttft"),
        "complete_ttft_p95": _p95(COMPLETE, w, "ttft"),
        "stream_completion_p95": _p95(STREAM, w, "completion"),
        "relay_faults": (
            f'sum(increase(bridge_relay_faults_total{{kind=~"{FAULT_KINDS}"}}[{w}])) or vector(0)'
        ),
        "breaker_open": f"max(max_over_time(bridge_breaker_open[{w}]))",
    }


class Prometheus:
    """Instant queries against ``PROMETHEUS_URL``; a failure or an empty answer is NaN."""

    def __init__(self, url: str | None, *, client: httpx.AsyncClient | None = None) -> None:
        self.url = url
        self._client = client or httpx.AsyncClient(timeout=QUERY_TIMEOUT_S)

    async def value(self, query: str) -> float:
        if self.url is None:
            return math.nan
        try:
            reply = await self._client.get(f"{self.url}/api/v1/query", params={"query": query})
            reply.raise_for_status()
            result = reply.json()["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("prometheus_query_failed", error=type(exc).__name__)
            return math.nan
        if not result:
            return math.nan
        try:
            return float(result[0]["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            return math.nan

    async def aclose(self) -> None:
        await self._client.aclose()


def _num(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else round(value, 6)


def _count(value: float) -> int:
    return 0 if math.isnan(value) else max(0, round(value))


def _judge(
    name: str, value: float, threshold: float, samples: int, window: Window,
    *, ok: bool, fail_at: int | None = None, detail: str | None = None,
) -> Gate:  # fmt: skip
    """``ok``: the value is within the threshold. No number, or too few samples, is ``wait``."""
    fail_at = window.fail_samples if fail_at is None else fail_at
    if math.isnan(value) or math.isinf(value):
        verdict = Verdict.WAIT
    elif not ok:
        verdict = Verdict.FAIL if samples >= fail_at else Verdict.WAIT
    else:
        verdict = Verdict.PASS if samples >= window.min_samples else Verdict.WAIT
    return Gate(
        name=name, value=_num(value), threshold=threshold, samples=samples, verdict=verdict,
        detail=detail,
    )  # fmt: skip


async def judge(prometheus: Prometheus, window: Window, *, now: float | None = None) -> list[Gate]:
    """Every gate of the stage that began at ``window.since``."""
    now = time.time() if now is None else now
    elapsed = max(0.0, now - window.since)
    span = f"{max(1, math.ceil(elapsed))}s"
    q = queries(span)
    values = await asyncio.gather(*(prometheus.value(query) for query in q.values()))
    v = dict(zip(q, values, strict=True))
    samples = _count(v["stream_samples"])
    complete_samples = _count(v["complete_samples"])
    dwell = Gate(
        name="dwell", value=round(elapsed, 3), threshold=window.dwell_s, samples=samples,
        verdict=Verdict.PASS if elapsed >= window.dwell_s else Verdict.WAIT,
    )  # fmt: skip
    ttft, ttft_complete = v["stream_ttft_p95"], v["complete_ttft_p95"]
    ratio = ttft / ttft_complete if ttft_complete > 0 else math.nan
    # both cohorts must have their samples before the comparison can pass
    relative_samples = min(samples, complete_samples)
    completion = v["stream_completion_p95"]
    late = max(0.0, v["stream_acks"] - v["stream_acks_in_time"])  # NaN stays NaN
    failed = v["stream_failed"] + late
    failed_ratio = failed / samples if samples > 0 else math.nan
    faults = v["relay_faults"]
    breaker = v["breaker_open"]
    return [
        dwell,
        _judge("p95_ttft", ttft, P95_TTFT_S, samples, window, ok=ttft <= P95_TTFT_S),
        _judge(
            "p95_ttft_vs_complete",
            ratio,
            TTFT_VS_COMPLETE,
            relative_samples,
            window,
            ok=ratio <= TTFT_VS_COMPLETE,
            detail=None if math.isnan(ttft_complete) else f"complete p95 {ttft_complete:.3f}s",
        ),  # fmt: skip
        _judge(
            "p95_completion",
            completion,
            P95_COMPLETION_S,
            samples,
            window,
            ok=completion <= P95_COMPLETION_S,
        ),  # fmt: skip
        _judge(
            "failed_sends",
            failed_ratio,
            FAILED_RATIO,
            samples,
            window,
            ok=failed_ratio <= FAILED_RATIO,
            detail=f"{_count(failed)} of {samples}",
        ),  # fmt: skip
        _judge("relay_faults", faults, 0.0, samples, window, ok=faults < 0.5, fail_at=1),
        _judge("breaker", breaker, 0.0, samples, window, ok=breaker < 0.5, fail_at=0),
    ]


def blocking(gates: list[Gate]) -> list[Gate]:
    """The gates that keep a stage from being promoted (failing or waiting)."""
    return [g for g in gates if g.verdict is not Verdict.PASS]


def failing(gates: list[Gate]) -> list[Gate]:
    return [g for g in gates if g.verdict is Verdict.FAIL]
