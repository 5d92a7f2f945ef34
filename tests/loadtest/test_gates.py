from __future__ import annotations

from typing import Any

import pytest

from loadtest.gates import ExitCode, GateSettings, Verdict, evaluate


def _window(
    *,
    n: int = 200,
    failed: int = 0,
    ttft: float | None = 1000.0,
    completion: float | None = 5000.0,
    wrong: int = 0,
) -> dict[str, Any]:
    return {
        "requests": {"scheduled": n, "failed": failed},
        "metrics": {"ttft": {"p95": ttft}, "completion": {"p95": completion}},
        "correctnessTotal": wrong,
    }


def test_values_equal_to_thresholds_pass() -> None:
    result = evaluate(
        _window(ttft=1500.0, completion=8000.0, failed=2), GateSettings(), fell_behind=False
    )
    assert result["verdict"] == Verdict.PASS
    assert [g["ok"] for g in result["gates"]] == [True, True, True, True]


@pytest.mark.parametrize(
    ("window", "gate"),
    [
        (_window(ttft=1500.001), "ttft_p95_ms"),
        (_window(completion=8000.5), "completion_p95_ms"),
        (_window(failed=3), "failed_send_rate"),
        (_window(wrong=1), "correctness_violations"),
        (_window(ttft=None), "ttft_p95_ms"),
    ],
)
def test_a_value_over_its_threshold_fails_that_gate(window: dict[str, Any], gate: str) -> None:
    result = evaluate(window, GateSettings(), fell_behind=False)
    assert result["verdict"] == Verdict.FAIL
    assert [g["name"] for g in result["gates"] if not g["ok"]] == [gate]


def test_too_few_samples_is_inconclusive_even_when_gates_fail() -> None:
    result = evaluate(_window(n=99, ttft=9999.0), GateSettings(), fell_behind=False)
    assert result["verdict"] == Verdict.INCONCLUSIVE


def test_generator_lag_turns_a_fail_into_inconclusive_but_keeps_a_pass() -> None:
    assert evaluate(_window(ttft=2000.0), GateSettings(), fell_behind=True)["verdict"] == (
        Verdict.INCONCLUSIVE
    )
    assert evaluate(_window(), GateSettings(), fell_behind=True)["verdict"] == Verdict.PASS


def test_thresholds_are_configurable() -> None:
    strict = GateSettings(ttft_p95_ms=999.0)
    assert evaluate(_window(), strict, fell_behind=False)["verdict"] == Verdict.FAIL


@pytest.mark.parametrize(
    ("window", "fell_behind", "code"),
    [
        (_window(), False, 0),
        (_window(ttft=2000.0), False, 1),
        (_window(failed=3), False, 1),
        (_window(n=3), False, 3),  # too few samples to judge
        (_window(ttft=2000.0), True, 3),  # the driver fell behind: nothing can be concluded
    ],
)
def test_the_process_exit_code_follows_the_windows_verdict(
    window: dict[str, Any], fell_behind: bool, code: int
) -> None:
    """The codes CI scripts branch on (README: 0 pass, 1 fail, 3 inconclusive)."""
    verdict = evaluate(window, GateSettings(), fell_behind=fell_behind)["verdict"]
    assert int(ExitCode.for_verdict(verdict)) == code
