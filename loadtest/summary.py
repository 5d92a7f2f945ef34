"""The run summary: one pure function of the run's settings and its per-request records.

``summarize`` is used both at the end of a run and by ``python -m loadtest recompute`` on the
JSONL, so the offline figures equal the live ones by construction (and a test checks it).
Statistics are per target: the whole run, each stage's steady-state window (ramps excluded), and
each path; the gates apply to the pooled steady-state windows of the gated target.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.gates import ExitCode, GateSettings, Verdict, evaluate
from loadtest.record import RequestRecord, Timeouts
from loadtest.runner import ConnectStats, TargetRun
from loadtest.schedule import Stage
from loadtest.stats import distribution, metrics, timeline

__all__ = ["SUMMARY_SCHEMA", "RunMeta", "summarize"]

SUMMARY_SCHEMA = "loadtest-summary/1"


@dataclass(frozen=True, kw_only=True)
class RunMeta:
    """The settings of a run, written as the first JSONL line and copied into the summary."""

    run_id: str
    started_at: str
    stages: tuple[Stage, ...]
    arrival: str
    seed: int
    users: int
    max_in_flight: int
    timeouts: Timeouts
    gates: GateSettings
    targets: dict[str, str]  # name -> URL, in run order
    gated_target: str
    prompt_chars: int
    stack_env: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunMeta:
        fields = dict(data)
        fields["stages"] = tuple(Stage(**s) for s in data["stages"])
        fields["timeouts"] = Timeouts(**data["timeouts"])
        fields["gates"] = GateSettings(**data["gates"])
        return cls(**fields)


_CORRECTNESS = (
    ("seqGaps", "seq_gaps"),
    ("duplicates", "duplicates"),
    ("outOfOrder", "out_of_order"),
    ("contentMismatch", "content_mismatch"),
    ("missingTerminal", "missing_terminal"),
    ("missingDone", "missing_done"),
    ("malformed", "malformed"),
)


def _window(records: Sequence[RequestRecord]) -> dict[str, Any]:
    failed = [r for r in records if not r.ok]
    correctness = {key: sum(int(getattr(r, attr)) for r in records) for key, attr in _CORRECTNESS}
    return {
        "requests": {
            "scheduled": len(records),
            "sent": sum(1 for r in records if r.sent_ms is not None),
            "ok": len(records) - len(failed),
            "failed": len(failed),
        },
        "failures": dict(sorted(Counter(str(r.failure) for r in failed).items())),
        "codes": dict(sorted(Counter(f"{r.failure}:{r.code}" for r in failed if r.code).items())),
        "paths": dict(sorted(Counter(str(r.path) for r in records).items())),
        "correctness": correctness,
        "correctnessTotal": sum(correctness.values()),
        "metrics": metrics(records),
    }


def _generator(run: TargetRun, gates: GateSettings) -> dict[str, Any]:
    lags = distribution(r.dispatch_lag_ms for r in run.records if r.dispatch_lag_ms is not None)
    waits = [r.slot_wait_ms for r in run.records if r.slot_wait_ms is not None]
    p99 = lags["p99"]
    fell_behind = p99 is not None and p99 > gates.max_dispatch_lag_ms
    process_pcts = [sample[1] for sample in run.cpu]
    machine_pcts = [sample[2] for sample in run.cpu]
    return {
        "dispatchLagMs": lags,
        "slotWaitMs": distribution(waits),
        "waitedForSlot": sum(1 for w in waits if w > 1.0),
        "fellBehind": fell_behind,
        "cpu": {
            "processCpuS": round(run.cpu_process_s, 3),
            "durationS": round(run.duration_s, 3),
            "processMeanPct": round(100.0 * run.cpu_process_s / run.duration_s, 1)
            if run.duration_s > 0
            else None,
            "processMaxPct": max(process_pcts, default=None),
            "machineMeanPct": round(sum(machine_pcts) / len(machine_pcts), 1)
            if machine_pcts
            else None,
        },
    }


def _connections(connect: ConnectStats) -> dict[str, Any]:
    return {
        "connected": len(connect.connect_ms),
        "connectMs": distribution(connect.connect_ms),
        "failures": dict(sorted(connect.failures.items())),
        "disconnects": connect.disconnects,
        "reconnects": connect.reconnects,
        "lateEvents": connect.late_events,
    }


def _target(meta: RunMeta, run: TargetRun) -> dict[str, Any]:
    steady = [r for r in run.records if r.steady]
    generator = _generator(run, meta.gates)
    stages = []
    start_s = 0.0
    for number, stage in enumerate(meta.stages):
        window = _window([r for r in steady if r.stage == number])
        window["stage"] = number
        window["label"] = stage.label
        window["ratePerS"] = stage.rate_per_s
        window["steadyWindowS"] = [start_s + stage.ramp_s, start_s + stage.duration_s]
        window["gates"] = evaluate(window, meta.gates, fell_behind=generator["fellBehind"])
        stages.append(window)
        start_s += stage.duration_s
    by_path: dict[str, list[RequestRecord]] = {}
    for record in steady:
        by_path.setdefault(str(record.path), []).append(record)
    return {
        "all": _window(run.records),
        "steady": _window(steady),
        "stages": stages,
        "byPath": {path: metrics(rs) for path, rs in sorted(by_path.items())},
        "generator": generator,
        "connections": _connections(run.connect),
        "timeline": timeline(run.records, max(run.duration_s, start_s)),
    }


def _comparison(targets: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if "bridge" not in targets or "direct" not in targets:
        return None
    rows = {}
    for metric in ("ack", "ttft", "completion", "gap"):
        for pct in ("p50", "p95", "p99"):
            bridge = targets["bridge"]["steady"]["metrics"][metric][pct]
            direct = targets["direct"]["steady"]["metrics"][metric][pct]
            delta = round(bridge - direct, 3) if bridge is not None and direct is not None else None
            rows[f"{metric}.{pct}"] = {"bridge": bridge, "direct": direct, "deltaMs": delta}
    return rows


def summarize(meta: RunMeta, runs: Sequence[TargetRun]) -> dict[str, Any]:
    """The JSON summary of a run; deterministic in its inputs."""
    targets = {run.target: _target(meta, run) for run in runs}
    gated = targets.get(meta.gated_target)
    if gated is None:
        result: dict[str, Any] = {
            "verdict": Verdict.INCONCLUSIVE.value,
            "gates": [],
            "reasons": [f"no results for the gated target {meta.gated_target!r}"],
        }
    else:
        fell_behind = bool(gated["generator"]["fellBehind"])
        result = evaluate(gated["steady"], meta.gates, fell_behind=fell_behind)
    verdict = Verdict(result["verdict"])
    return {
        "schema": SUMMARY_SCHEMA,
        "run": meta.to_json(),
        "verdict": verdict.value,
        "exitCode": int(ExitCode.for_verdict(verdict)),
        "gatedTarget": meta.gated_target,
        "gates": result["gates"],
        "reasons": result["reasons"],
        "targets": targets,
        "comparison": _comparison(targets),
    }
