"""Release gates (seed defaults: p95 TTFT <= 1.5 s, p95 completion <= 8 s, failed sends <= 1 %).

Every gate passes when the measured value is ``<=`` its threshold. The verdict is:

- ``inconclusive`` when the window holds fewer than ``min_samples`` requests (too few to judge);
- ``fail`` when a gate does not hold -- unless the generator fell behind its schedule (p99 of its
  own dispatch lag over ``max_dispatch_lag_ms``): then ``inconclusive``, because an overloaded
  generator inflates every latency it measures. A pass stays a pass in that case: latencies are
  timed from the scheduled send, so generator lag can only make the figures worse, never better;
- ``pass`` otherwise.

Failed sends count every failure class (ack timeout, rejection, ai_message_error, disconnect,
stall, timeout, unsent): from the user's side each is a message that did not get its reply. A
percentile that is infinite (more failures than the percentile leaves room for) fails its gate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import IntEnum, StrEnum
from typing import Any

__all__ = [
    "DEFAULT_COMPLETION_P95_MS",
    "DEFAULT_FAILED_SEND_RATE",
    "DEFAULT_MAX_DISPATCH_LAG_MS",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_TTFT_P95_MS",
    "ExitCode",
    "GateSettings",
    "Verdict",
    "evaluate",
]

DEFAULT_TTFT_P95_MS = 1500.0
DEFAULT_COMPLETION_P95_MS = 8000.0
DEFAULT_FAILED_SEND_RATE = 0.01
DEFAULT_MAX_CORRECTNESS_VIOLATIONS = 0
DEFAULT_MIN_SAMPLES = 100
DEFAULT_MAX_DISPATCH_LAG_MS = 50.0


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class ExitCode(IntEnum):
    """Process exit codes; 2 is argparse's usage error."""

    PASS = 0
    FAIL = 1
    USAGE = 2
    INCONCLUSIVE = 3
    ERROR = 4  # the run could not be made (stack did not start, no connection at all ...)

    @classmethod
    def for_verdict(cls, verdict: Verdict) -> ExitCode:
        return {Verdict.PASS: cls.PASS, Verdict.FAIL: cls.FAIL}.get(verdict, cls.INCONCLUSIVE)


@dataclass(frozen=True, kw_only=True)
class GateSettings:
    ttft_p95_ms: float = DEFAULT_TTFT_P95_MS
    completion_p95_ms: float = DEFAULT_COMPLETION_P95_MS
    failed_send_rate: float = DEFAULT_FAILED_SEND_RATE
    max_correctness_violations: int = DEFAULT_MAX_CORRECTNESS_VIOLATIONS
    min_samples: int = DEFAULT_MIN_SAMPLES
    max_dispatch_lag_ms: float = DEFAULT_MAX_DISPATCH_LAG_MS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _gate(name: str, value: float | None, threshold: float) -> dict[str, Any]:
    # ``None`` is an infinite percentile: it fails any finite threshold.
    return {
        "name": name,
        "value": value,
        "threshold": threshold,
        "ok": value is not None and value <= threshold,
    }


def evaluate(
    window: dict[str, Any], settings: GateSettings, *, fell_behind: bool
) -> dict[str, Any]:
    """Gate results and verdict for one window's summary (``requests``, ``metrics`` ...)."""
    requests = window["requests"]
    total = requests["scheduled"]
    failed = requests["failed"]
    rate = failed / total if total else None
    gates = [
        _gate("ttft_p95_ms", window["metrics"]["ttft"]["p95"], settings.ttft_p95_ms),
        _gate(
            "completion_p95_ms", window["metrics"]["completion"]["p95"], settings.completion_p95_ms
        ),
        _gate(
            "failed_send_rate", None if rate is None else round(rate, 6), settings.failed_send_rate
        ),
        _gate(
            "correctness_violations",
            window["correctnessTotal"],
            settings.max_correctness_violations,
        ),
    ]
    reasons = []
    if total < settings.min_samples:
        verdict = Verdict.INCONCLUSIVE
        reasons.append(
            f"{total} requests in the window, fewer than the minimum {settings.min_samples}"
        )
    elif all(g["ok"] for g in gates):
        verdict = Verdict.PASS
    elif fell_behind:
        verdict = Verdict.INCONCLUSIVE
        reasons.append("a gate failed but the generator fell behind its schedule")
    else:
        verdict = Verdict.FAIL
    reasons += [f"{g['name']} = {g['value']} > {g['threshold']}" for g in gates if not g["ok"]]
    return {"verdict": verdict.value, "gates": gates, "reasons": reasons}
