"""One load-test run end to end: (stack,) targets in order, then the summary and the files."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from loadtest.gates import GateSettings
from loadtest.record import Timeouts
from loadtest.report_html import render_html
from loadtest.report_text import format_progress, format_summary
from loadtest.results import write_json, write_jsonl
from loadtest.runner import Progress, Runner, RunSettings, Target, TargetRun
from loadtest.schedule import ArrivalKind, Stage, build_schedule
from loadtest.socketio_target import SocketIoSettings, SocketIoTarget
from loadtest.sse_target import DEFAULT_BACKEND_TOKEN, SseSettings, SseTarget
from loadtest.stack import EmbeddedStack
from loadtest.summary import RunMeta, summarize
from loadtest.tokens import User, load_users, mint_users

__all__ = ["LoadTestSettings", "RunOutcome", "execute"]

DEFAULT_PROMPT = "Tell me a short story about a lighthouse keeper."

# The embedded stack is a benchmark rig: its per-user send limit (30/min by default) is product
# policy, and N simulated users at R requests/s exceed it whenever R/N > 0.5/s, which would
# measure the limiter instead of streaming. ``--stack-env BRIDGE_RATE_LIMIT=30`` puts it back.
STACK_DEFAULT_ENV = {"BRIDGE_RATE_LIMIT": "0"}


@dataclass(frozen=True, kw_only=True)
class LoadTestSettings:
    """Everything ``python -m loadtest run`` was asked to do."""

    stages: tuple[Stage, ...]
    bridge_url: str | None = None
    direct_url: str | None = None
    compare: bool = False
    jwt_secret: str | None = None
    token_file: Path | None = None
    roles: tuple[str, ...] = ()
    backend_token: str | None = None  # None: the stack's (--stack) or the dev token
    arrival: ArrivalKind = ArrivalKind.POISSON
    seed: int = 1
    users: int = 100
    max_in_flight: int | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    gates: GateSettings = field(default_factory=GateSettings)
    prompt: str = DEFAULT_PROMPT
    socketio_path: str = "/socket.io/"
    connect_timeout_s: float = 10.0
    connect_concurrency: int = 50
    out_dir: Path | None = None
    stack: bool = False
    stack_env: dict[str, str] = field(default_factory=dict)
    stack_port: int | None = None
    stack_start_timeout_s: float = 60.0
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class RunOutcome:
    summary: dict[str, Any]
    runs: list[TargetRun]
    out_dir: Path


def _targets(settings: LoadTestSettings) -> list[Target]:
    targets: list[Target] = []
    if settings.bridge_url and (settings.compare or not settings.direct_url):
        targets.append(
            SocketIoTarget(
                settings.bridge_url,
                SocketIoSettings(
                    prompt=settings.prompt,
                    socketio_path=settings.socketio_path,
                    connect_timeout_s=settings.connect_timeout_s,
                    connect_concurrency=settings.connect_concurrency,
                ),
            )
        )
    if settings.direct_url and (settings.compare or not targets):
        targets.append(
            SseTarget(
                settings.direct_url,
                SseSettings(
                    prompt=settings.prompt,
                    backend_token=settings.backend_token or DEFAULT_BACKEND_TOKEN,
                    connect_timeout_s=settings.connect_timeout_s,
                ),
            )
        )
    if not targets:
        raise ValueError("nothing to test: give --url, --direct, or --stack")
    if settings.compare and len(targets) != 2:
        raise ValueError("--compare needs both a bridge (--url or --stack) and --direct")
    return targets


def _users(settings: LoadTestSettings, run_id: str) -> list[User]:
    if settings.token_file is not None:
        return load_users(settings.token_file, settings.users, run_id=run_id)
    if settings.jwt_secret is None:
        if settings.bridge_url and (settings.compare or not settings.direct_url):
            raise ValueError("the bridge needs --jwt-secret or --token-file")
        return mint_users("unused-direct-only", settings.users, run_id=run_id)
    return mint_users(settings.jwt_secret, settings.users, run_id=run_id, roles=settings.roles)


def _progress_printer(target: str, out: TextIO) -> Callable[[Progress], None]:
    tty = out.isatty()

    def show(progress: Progress) -> None:
        line = format_progress(target, progress)
        if tty:
            out.write("\r\x1b[2K" + line)
        elif round(progress.elapsed_s) % 5 == 0:
            out.write(line + "\n")
        out.flush()

    return show


async def execute(
    settings: LoadTestSettings, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> RunOutcome:
    """Run every target, write the files, return the summary. Raises on set-up errors.

    ``direct_url=""`` means "the stack's backend" and needs ``stack=True``.
    """
    if settings.stack:
        stack = EmbeddedStack(
            env={**STACK_DEFAULT_ENV, **settings.stack_env},
            port=settings.stack_port,
            start_timeout_s=settings.stack_start_timeout_s,
        )
        async with stack as info:
            err.write(f"stack up: bridge {info.bridge_url}, backend {info.backend_url}\n")
            resolved = replace(
                settings,
                bridge_url=settings.bridge_url or info.bridge_url,
                direct_url=settings.direct_url
                or (info.backend_url if settings.compare or settings.direct_url == "" else None),
                jwt_secret=settings.jwt_secret or info.jwt_secret,
                backend_token=settings.backend_token or info.backend_token,
            )
            return await _execute(resolved, out, err)
    if settings.direct_url == "":
        raise ValueError("--direct needs a backend URL unless --stack starts one")
    return await _execute(settings, out, err)


async def _execute(settings: LoadTestSettings, out: TextIO, err: TextIO) -> RunOutcome:
    run_id = secrets.token_hex(4)
    targets = _targets(settings)
    users = _users(settings, run_id)
    max_in_flight = min(settings.max_in_flight or settings.users, settings.users)
    schedule = build_schedule(settings.stages, kind=settings.arrival, seed=settings.seed)
    meta = RunMeta(
        run_id=run_id,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        stages=settings.stages,
        arrival=settings.arrival.value,
        seed=settings.seed,
        users=settings.users,
        max_in_flight=max_in_flight,
        timeouts=settings.timeouts,
        gates=settings.gates,
        targets={
            t.name: str(settings.bridge_url if t.name == "bridge" else settings.direct_url)
            for t in targets
        },
        gated_target=targets[0].name,
        prompt_chars=len(settings.prompt),
        stack_env={**STACK_DEFAULT_ENV, **settings.stack_env} if settings.stack else {},
    )
    err.write(
        f"run {run_id}: {len(schedule)} requests scheduled over "
        f"{sum(s.duration_s for s in settings.stages):g}s, {settings.users} users, "
        f"targets {', '.join(t.name for t in targets)}\n"
    )
    runs = []
    for target in targets:
        runner = Runner(
            target,
            schedule,
            users,
            RunSettings(max_in_flight=max_in_flight, timeouts=settings.timeouts),
            run_id=run_id,
            progress=_progress_printer(target.name, err) if settings.progress else None,
        )
        runs.append(await runner.run())
        if settings.progress and err.isatty():
            err.write("\n")
    summary = summarize(meta, runs)
    out_dir = settings.out_dir or Path("loadtest-results") / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "requests.jsonl", meta, runs)
    write_json(out_dir / "summary.json", summary)
    (out_dir / "report.html").write_text(render_html(summary, runs))
    out.write(format_summary(summary) + "\n")
    out.write(f"results in {out_dir}/ (summary.json, requests.jsonl, report.html)\n")
    return RunOutcome(summary=summary, runs=runs, out_dir=out_dir)
