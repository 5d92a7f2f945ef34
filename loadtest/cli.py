"""Command line: ``run`` (a load test), ``recompute`` (summary and gates from a JSONL, offline)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO, TypeVar

import orjson

from loadtest.gates import ExitCode, GateSettings
from loadtest.record import Timeouts
from loadtest.report_html import render_html
from loadtest.report_text import format_summary
from loadtest.results import read_jsonl, write_json
from loadtest.run import DEFAULT_PROMPT, LoadTestSettings, execute
from loadtest.schedule import ArrivalKind, parse_duration_s, parse_stage
from loadtest.stack import DEFAULT_STACK_START_TIMEOUT_S, StackStartError
from loadtest.summary import summarize

__all__ = ["build_parser", "main"]

T = TypeVar("T")

DEFAULT_STAGE = "20s:5/s"
SCRIPTED_FLAGS = (
    ("scripted_ttft_ms", "SCRIPTED_TTFT_MS"),
    ("scripted_tokens_per_s", "SCRIPTED_TOKENS_PER_S"),
    ("scripted_reply_tokens", "SCRIPTED_REPLY_TOKENS"),
)


def _duration(text: str) -> float:
    try:
        return parse_duration_s(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_gate_flags(parser: argparse.ArgumentParser) -> None:
    gates = parser.add_argument_group("gates (a gate passes when value <= threshold)")
    gates.add_argument(
        "--gate-ttft-p95", type=_duration, metavar="DUR", help="p95 TTFT threshold (default 1.5s)"
    )
    gates.add_argument(
        "--gate-completion-p95",
        type=_duration,
        metavar="DUR",
        help="p95 completion threshold (default 8s)",
    )
    gates.add_argument(
        "--gate-failed-rate",
        type=float,
        metavar="FRACTION",
        help="failed sends / requests threshold (default 0.01)",
    )
    gates.add_argument(
        "--gate-correctness",
        type=int,
        metavar="N",
        help="correctness violations allowed (default 0)",
    )
    gates.add_argument(
        "--min-samples",
        type=int,
        metavar="N",
        help="fewer requests in the window = inconclusive (default 100)",
    )
    gates.add_argument(
        "--max-lag",
        type=_duration,
        metavar="DUR",
        help="p99 generator dispatch lag beyond which a failing run is inconclusive (default 50ms)",
    )


def _gate_settings(args: argparse.Namespace, base: GateSettings) -> GateSettings:
    changes: dict[str, float | int] = {}
    for flag, name, scale in (
        ("gate_ttft_p95", "ttft_p95_ms", 1000.0),
        ("gate_completion_p95", "completion_p95_ms", 1000.0),
        ("gate_failed_rate", "failed_send_rate", None),
        ("gate_correctness", "max_correctness_violations", None),
        ("min_samples", "min_samples", None),
        ("max_lag", "max_dispatch_lag_ms", 1000.0),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[name] = value * scale if scale else value
    return replace(base, **changes)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chat-loadtest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a load test",
        description="Open-loop load test of the "
        "bridge (Socket.IO) and/or the backend's SSE directly.",
    )
    where = run.add_argument_group("target")
    where.add_argument("--url", help="bridge base URL, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--direct",
        nargs="?",
        const="",
        metavar="BACKEND_URL",
        help="test the backend's SSE instead (with --stack: its backend)",
    )
    where.add_argument(
        "--compare",
        action="store_true",
        help="run the bridge, then direct, same schedule; side by side",
    )
    where.add_argument(
        "--backend-token", default=None, help="service token for --direct (default: the stack's)"
    )
    where.add_argument("--socketio-path", default="/socket.io/")
    auth = run.add_argument_group("identity")
    auth.add_argument("--jwt-secret", help="mint HS256 JWTs, one user per connection")
    auth.add_argument("--token-file", type=Path, help="JWTs, one per line, instead")
    auth.add_argument("--roles", default="", help="comma-separated roles claim for minted JWTs")
    load = run.add_argument_group("load")
    load.add_argument(
        "--stage",
        action="append",
        metavar="DUR:RATE[:RAMP]",
        help=f"repeatable, e.g. --stage 30s:50/s --stage 60s:200/s:10s (default {DEFAULT_STAGE})",
    )
    load.add_argument(
        "--ramp",
        type=_duration,
        metavar="DUR",
        help="ramp of stages that give none (default: 1/5 of the stage, <= 5s)",
    )
    load.add_argument("--arrival", choices=[k.value for k in ArrivalKind], default="poisson")
    load.add_argument("--seed", type=int, default=1)
    load.add_argument("--users", type=int, default=100, help="connections, one user/room each")
    load.add_argument("--max-in-flight", type=int, help="concurrency cap (default: --users)")
    load.add_argument("--prompt", default=DEFAULT_PROMPT)
    limits = run.add_argument_group("limits (a request past one fails in that class)")
    limits.add_argument("--ack-timeout", type=_duration, default=10.0, metavar="DUR")
    limits.add_argument("--ttft-timeout", type=_duration, default=30.0, metavar="DUR")
    limits.add_argument("--stall-timeout", type=_duration, default=10.0, metavar="DUR")
    limits.add_argument("--total-timeout", type=_duration, default=60.0, metavar="DUR")
    limits.add_argument("--done-timeout", type=_duration, default=5.0, metavar="DUR")
    limits.add_argument("--connect-timeout", type=_duration, default=10.0, metavar="DUR")
    limits.add_argument("--connect-concurrency", type=int, default=50)
    _add_gate_flags(run)
    stack = run.add_argument_group("embedded stack")
    stack.add_argument("--stack", action="store_true", help="spawn `python -m bridge stack`")
    stack.add_argument("--stack-port", type=int)
    stack.add_argument("--stack-timeout", type=_duration, default=DEFAULT_STACK_START_TIMEOUT_S)
    stack.add_argument("--scripted-ttft-ms", type=int)
    stack.add_argument("--scripted-tokens-per-s", type=float)
    stack.add_argument("--scripted-reply-tokens", type=int)
    stack.add_argument(
        "--stack-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more environment for the stack (repeatable)",
    )
    output = run.add_argument_group("output")
    output.add_argument("--out", type=Path, help="directory (default loadtest-results/<run id>)")
    output.add_argument("--quiet", action="store_true", help="no live progress line")
    output.add_argument(
        "--no-uvloop",
        action="store_true",
        help="use asyncio's own loop (default: uvloop if installed)",
    )

    again = sub.add_parser("recompute", help="summary and gates from a requests.jsonl, offline")
    again.add_argument("jsonl", type=Path)
    again.add_argument(
        "--check",
        type=Path,
        metavar="SUMMARY_JSON",
        help="exit 1 unless the recomputed summary equals this one",
    )
    again.add_argument("--json", type=Path, help="write the recomputed summary here")
    again.add_argument("--html", type=Path, help="write an HTML report here")
    _add_gate_flags(again)
    return parser


def _run_settings(args: argparse.Namespace) -> LoadTestSettings:
    stages = tuple(parse_stage(s, default_ramp_s=args.ramp) for s in args.stage or [DEFAULT_STAGE])
    stack_env = dict(args.stack_env)
    for flag, env_name in SCRIPTED_FLAGS:
        if getattr(args, flag) is not None:
            stack_env[env_name] = f"{getattr(args, flag):g}"
    if stack_env and not args.stack:
        raise ValueError("--scripted-* and --stack-env only apply with --stack")
    if args.users < 1:
        raise ValueError("--users must be >= 1")
    return LoadTestSettings(
        stages=stages,
        bridge_url=args.url,
        direct_url=args.direct,
        compare=args.compare,
        jwt_secret=args.jwt_secret,
        token_file=args.token_file,
        roles=tuple(r for r in args.roles.split(",") if r),
        backend_token=args.backend_token,
        arrival=ArrivalKind(args.arrival),
        seed=args.seed,
        users=args.users,
        max_in_flight=args.max_in_flight,
        timeouts=Timeouts(
            ack_s=args.ack_timeout,
            ttft_s=args.ttft_timeout,
            stall_s=args.stall_timeout,
            total_s=args.total_timeout,
            done_s=args.done_timeout,
        ),
        gates=_gate_settings(args, GateSettings()),
        prompt=args.prompt,
        socketio_path=args.socketio_path,
        connect_timeout_s=args.connect_timeout,
        connect_concurrency=args.connect_concurrency,
        out_dir=args.out,
        stack=args.stack,
        stack_env=stack_env,
        stack_port=args.stack_port,
        stack_start_timeout_s=args.stack_timeout,
        progress=not args.quiet,
    )


def _recompute(args: argparse.Namespace, out: TextIO) -> int:
    meta, runs = read_jsonl(args.jsonl)
    meta = replace(meta, gates=_gate_settings(args, meta.gates))
    summary = orjson.loads(orjson.dumps(summarize(meta, runs)))
    out.write(format_summary(summary) + "\n")
    if args.json:
        write_json(args.json, summary)
    if args.html:
        args.html.write_text(render_html(summary, runs))
    if args.check:
        expected = orjson.loads(args.check.read_bytes())
        if expected != summary:
            diff = sorted(k for k in summary if summary.get(k) != expected.get(k))
            out.write(f"MISMATCH with {args.check}: top-level keys differ: {diff}\n")
            return int(ExitCode.FAIL)
        out.write(f"recomputed summary equals {args.check}\n")
    return int(summary["exitCode"])


def _run_loop(coro: Coroutine[Any, Any, T], *, uvloop: bool) -> T:
    """uvloop cuts the client's CPU per event by ~25 % (see ``loadtest.sio_client``)."""
    if uvloop:
        try:
            import uvloop as uv
        except ImportError:
            pass
        else:
            return uv.run(coro)
    return asyncio.run(coro)


def _sigterm_as_interrupt() -> None:
    """SIGTERM ends a run like Ctrl-C does, so ``--stack`` still tears its stack down.

    Regression: a ``kill`` of the load tester left the spawned stack (its own process group)
    running.
    """
    if threading.current_thread() is threading.main_thread():  # not when embedded in a thread
        signal.signal(signal.SIGTERM, lambda _sig, _frame: signal.raise_signal(signal.SIGINT))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _sigterm_as_interrupt()
    try:
        if args.command == "recompute":
            return _recompute(args, sys.stdout)
        settings = _run_settings(args)
        outcome = _run_loop(execute(settings), uvloop=not args.no_uvloop)
        return int(outcome.summary["exitCode"])
    except (ValueError, OSError, StackStartError) as exc:
        sys.stderr.write(f"chat-loadtest: error: {exc}\n")
        return int(ExitCode.ERROR)
    except KeyboardInterrupt:
        sys.stderr.write("chat-loadtest: interrupted\n")
        return 130
