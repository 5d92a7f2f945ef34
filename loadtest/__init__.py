"""Open-loop Socket.IO / SSE load generator measuring TTFT and gating releases (issue 4)."""

from loadtest.gates import ExitCode, GateSettings, Verdict
from loadtest.record import Failure, RequestRecord, Timeouts
from loadtest.results import read_jsonl, recompute
from loadtest.run import LoadTestSettings, execute
from loadtest.schedule import ArrivalKind, Stage, build_schedule, parse_stage
from loadtest.summary import summarize

__all__ = [
    "ArrivalKind",
    "ExitCode",
    "Failure",
    "GateSettings",
    "LoadTestSettings",
    "RequestRecord",
    "Stage",
    "Timeouts",
    "Verdict",
    "build_schedule",
    "execute",
    "parse_stage",
    "read_jsonl",
    "recompute",
    "summarize",
]
