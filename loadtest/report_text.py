"""Terminal output: the live progress line and the end-of-run summary table."""

from __future__ import annotations

from typing import Any, TextIO

from loadtest.runner import Progress

__all__ = ["format_progress", "format_summary"]


def _ms(value: float | None) -> str:
    if value is None:
        return "inf"
    return f"{value / 1000.0:.2f}s" if value >= 1000.0 else f"{value:.0f}ms"


def format_progress(target: str, progress: Progress) -> str:
    """One line, e.g. ``bridge  t=12s sent 600 in-flight 120 ok 550 fail 3 p95ttft(10s) 320ms``."""
    p95 = "-" if progress.finished == 0 else _ms(progress.recent_ttft_p95_ms)
    lag = "-" if progress.recent_lag_max_ms is None else f"{progress.recent_lag_max_ms:.0f}ms"
    return (
        f"{target:<6} t={progress.elapsed_s:5.0f}s sched {progress.scheduled} "
        f"sent {progress.sent} in-flight {progress.in_flight} waiting {progress.waiting} "
        f"done {progress.finished} fail {progress.failed} p95ttft(10s) {p95} "
        f"lag max {lag} cpu {progress.cpu_pct:.0f}%"
    )


def _dist_row(name: str, dist: dict[str, Any]) -> str:
    cells = " ".join(
        f"{_ms(dist[k]) if dist['n'] else '-':>8}" for k in ("p50", "p90", "p95", "p99", "max")
    )
    censored = f"  ({dist['censored']} failed as inf)" if dist["censored"] else ""
    return f"  {name:<22}{dist['n']:>7} {cells}{censored}"


def _window_lines(title: str, window: dict[str, Any]) -> list[str]:
    req = window["requests"]
    lines = [
        f" {title}: {req['scheduled']} requests, {req['ok']} ok, {req['failed']} failed",
        f"  {'metric':<22}{'n':>7} {'p50':>8} {'p90':>8} {'p95':>8} {'p99':>8} {'max':>8}",
    ]
    for metric in ("ack", "ttft", "completion", "done", "gap"):
        lines.append(_dist_row(metric, window["metrics"][metric]))
    return lines


def _target_lines(name: str, target: dict[str, Any]) -> list[str]:
    allw = target["all"]
    lines = [f"== {name} =="]
    lines += _window_lines("steady state (ramps excluded)", target["steady"])
    for stage in target["stages"]:
        verdict = stage["gates"]["verdict"]
        lines += _window_lines(f"stage {stage['stage']} {stage['label']} [{verdict}]", stage)
    for path, dists in target["byPath"].items():
        lines.append(f" path {path}:")
        lines += [_dist_row(m, dists[m]) for m in ("ttft", "completion")]
    failures = ", ".join(f"{k} {v}" for k, v in allw["failures"].items()) or "none"
    codes = ", ".join(f"{k} {v}" for k, v in allw["codes"].items())
    lines.append(f" failures (whole run): {failures}" + (f" [{codes}]" if codes else ""))
    wrong = ", ".join(f"{k} {v}" for k, v in allw["correctness"].items() if v) or "none"
    lines.append(f" correctness violations: {wrong}")
    gen = target["generator"]
    cpu = gen["cpu"]
    lines.append(
        f" generator: dispatch lag p99 {_ms(gen['dispatchLagMs']['p99'])} max "
        f"{_ms(gen['dispatchLagMs']['max'])}{'  FELL BEHIND' if gen['fellBehind'] else ''}; "
        f"{gen['waitedForSlot']} waited for a free connection; CPU mean "
        f"{cpu['processMeanPct']}% max {cpu['processMaxPct']}% (machine {cpu['machineMeanPct']}%)"
    )
    conn = target["connections"]
    if conn["connected"] or conn["failures"]:
        lines.append(
            f" connections: {conn['connected']} opened (p95 {_ms(conn['connectMs']['p95'])}), "
            f"failures {conn['failures'] or 'none'}, disconnects {conn['disconnects']}, "
            f"reconnects {conn['reconnects']}"
        )
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, target in summary["targets"].items():
        lines += _target_lines(name, target)
    if summary["comparison"]:
        lines.append("== bridge vs direct (steady state) ==")
        for key, row in summary["comparison"].items():
            lines.append(
                f"  {key:<16} bridge {_ms(row['bridge']):>8}  direct {_ms(row['direct']):>8}"
                f"  delta {_ms(row['deltaMs']) if row['deltaMs'] is not None else '-':>8}"
            )
    lines.append(f"== gates ({summary['gatedTarget']}) ==")
    for gate in summary["gates"]:
        mark = "ok  " if gate["ok"] else "FAIL"
        lines.append(f"  {mark} {gate['name']:<24} {gate['value']} <= {gate['threshold']}")
    lines.append(f"VERDICT: {summary['verdict'].upper()} (exit {summary['exitCode']})")
    lines += [f"  - {reason}" for reason in summary["reasons"]]
    return "\n".join(lines)


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    out.write(format_summary(summary) + "\n")
