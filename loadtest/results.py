"""Result files: the JSONL of every request (and how to read it back) and the JSON summary.

JSONL layout, one JSON object per line, each with a ``type``:
``run`` (the ``RunMeta``, first line), then per target its ``request`` lines (``RequestRecord``,
in schedule order) followed by one ``target_end`` (connections, CPU samples, duration). That is all
``summarize`` needs, so ``recompute`` reproduces the summary exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from loadtest.record import RequestRecord
from loadtest.runner import ConnectStats, TargetRun
from loadtest.summary import RunMeta, summarize

__all__ = ["read_jsonl", "recompute", "write_json", "write_jsonl"]


def write_jsonl(path: Path, meta: RunMeta, runs: Sequence[TargetRun]) -> None:
    with path.open("wb") as out:
        out.write(orjson.dumps({"type": "run", **meta.to_json()}) + b"\n")
        for run in runs:
            for record in run.records:
                out.write(orjson.dumps(record.to_json()) + b"\n")
            end = {
                "type": "target_end",
                "target": run.target,
                "connect": asdict(run.connect),
                "cpu": run.cpu,
                "cpu_process_s": run.cpu_process_s,
                "duration_s": run.duration_s,
            }
            out.write(orjson.dumps(end) + b"\n")


def read_jsonl(path: Path) -> tuple[RunMeta, list[TargetRun]]:
    """Parse a results JSONL; raises ``ValueError`` on a file that is not one."""
    meta: RunMeta | None = None
    runs: list[TargetRun] = []
    pending: list[RequestRecord] = []
    with path.open("rb") as source:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            data: dict[str, Any] = orjson.loads(line)
            kind = data.get("type")
            if kind == "run":
                meta = RunMeta.from_json({k: v for k, v in data.items() if k != "type"})
            elif kind == "request":
                pending.append(RequestRecord.from_json(data))
            elif kind == "target_end":
                runs.append(_target_run(data, pending))
                pending = []
            else:
                raise ValueError(f"{path}:{number}: unknown line type {kind!r}")
    if meta is None:
        raise ValueError(f"{path}: no 'run' line")
    if pending:
        raise ValueError(f"{path}: {len(pending)} request lines after the last target_end")
    return meta, runs


def _target_run(data: dict[str, Any], records: list[RequestRecord]) -> TargetRun:
    return TargetRun(
        target=data["target"],
        records=records,
        connect=ConnectStats(**data["connect"]),
        cpu=[(float(t), float(p), float(m)) for t, p, m in data["cpu"]],
        cpu_process_s=float(data["cpu_process_s"]),
        duration_s=float(data["duration_s"]),
    )


def recompute(path: Path) -> dict[str, Any]:
    meta, runs = read_jsonl(path)
    return summarize(meta, runs)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
