"""The load tester against the real services (bridge + backend + Redis as child processes).

Tolerances are generous: the machine has 2 cores shared with other work. Each run is a few seconds
at a few requests per second.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from loadtest.gates import ExitCode, GateSettings
from loadtest.record import Timeouts
from loadtest.results import recompute
from loadtest.run import LoadTestSettings, RunOutcome, execute
from loadtest.schedule import ArrivalKind, parse_stage
from loadtest.stack import EmbeddedStack
from tests.support.procs import ServerProcess, free_port

SECRET = "real-stack-test-secret-0123456789abcdef"
TOKEN = "real-stack-backend-token"


@contextmanager
def services(
    redis_url: str,
    *,
    ttft_ms: int = 200,
    tokens_per_s: int = 50,
    reply_tokens: int = 10,
    backend_url: str | None = None,
) -> Iterator[tuple[ServerProcess | None, ServerProcess]]:
    """A backend (unless ``backend_url`` points elsewhere) and a bridge in front of it."""
    backend = None
    if backend_url is None:
        backend = ServerProcess.python_module(
            "backend_stream",
            env={
                "REDIS_URL": redis_url,
                "BACKEND_TOKEN": TOKEN,
                "PROVIDER": "scripted",
                "SCRIPTED_TTFT_MS": str(ttft_ms),
                "SCRIPTED_TOKENS_PER_S": str(tokens_per_s),
                "SCRIPTED_REPLY_TOKENS": str(reply_tokens),
            },
        ).start(timeout_s=30)
        backend_url = backend.url
    bridge = ServerProcess.python_module(
        "bridge",
        env={
            "BACKEND_URL": backend_url,
            "BACKEND_TOKEN": TOKEN,
            "REDIS_URL": redis_url,
            "JWT_SECRET": SECRET,
            "BRIDGE_RATE_LIMIT": "0",
        },
    )
    try:
        bridge.start(timeout_s=30)
        yield backend, bridge
    finally:
        bridge.stop()
        if backend is not None:
            backend.stop()


async def _load(
    url: str | None,
    out: Path,
    *,
    stage: str = "3s:4/s:0s",
    gates: GateSettings | None = None,
    timeouts: Timeouts | None = None,
    **extra: object,
) -> RunOutcome:
    fields: dict[str, object] = {
        "stages": (parse_stage(stage),),
        "bridge_url": url,
        "jwt_secret": SECRET,
        "users": 8,
        "arrival": ArrivalKind.CONSTANT,
        "backend_token": TOKEN,
        "progress": False,
        "out_dir": out,
        "gates": gates or GateSettings(min_samples=5),
        "timeouts": timeouts or Timeouts(ack_s=10, ttft_s=10, stall_s=10, total_s=20, done_s=3),
    }
    fields.update(extra)
    settings = LoadTestSettings(**fields)  # type: ignore[arg-type]
    return await execute(settings, out=io.StringIO(), err=io.StringIO())


def _outcomes(outcome: RunOutcome, target: str = "bridge") -> Counter[str]:
    run = next(r for r in outcome.runs if r.target == target)
    return Counter(f"{r.failure}:{r.code}" for r in run.records)


async def test_stack_mode_figures_land_on_the_scripted_model_and_recompute_exactly(
    tmp_path: Path,
) -> None:
    outcome = await _load(
        None,
        tmp_path,
        stage="4s:4/s:0s",
        compare=True,
        jwt_secret=None,
        backend_token=None,  # the stack made a random one; run.py reads it from READY
        stack=True,
        stack_env={
            "SCRIPTED_TTFT_MS": "400",
            "SCRIPTED_TOKENS_PER_S": "50",
            "SCRIPTED_REPLY_TOKENS": "20",
        },
    )
    summary = outcome.summary
    for target in ("bridge", "direct"):
        steady = summary["targets"][target]["steady"]
        assert steady["requests"]["failed"] == 0, steady["failures"]
        ttft, completion = steady["metrics"]["ttft"], steady["metrics"]["completion"]
        assert 400 <= ttft["p50"] <= 750, (target, ttft)
        assert ttft["p95"] <= 1000, (target, ttft)
        # 19 more tokens at 50/s after the first: ~380 ms after TTFT.
        assert 700 <= completion["p50"] <= 1400, (target, completion)
        assert steady["correctnessTotal"] == 0, steady["correctness"]
    written = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert orjson.loads(orjson.dumps(recompute(tmp_path / "requests.jsonl"))) == written
    assert written["run"]["stack_env"]["SCRIPTED_TTFT_MS"] == "400"


async def test_backend_down_fails_every_request_as_ai_error_backend_unavailable(
    redis_url: str, tmp_path: Path
) -> None:
    with services(redis_url, backend_url=f"http://127.0.0.1:{free_port()}") as (_, bridge):
        outcome = await _load(bridge.url, tmp_path, stage="2s:4/s:0s")
    assert _outcomes(outcome) == {"ai_error:BACKEND_UNAVAILABLE": 8}
    assert outcome.summary["verdict"] == "fail"


async def test_backend_killed_mid_run_fails_only_with_backend_codes(
    redis_url: str, tmp_path: Path
) -> None:
    with services(redis_url, ttft_ms=200, tokens_per_s=10, reply_tokens=30) as (backend, bridge):
        assert backend is not None
        run = asyncio.create_task(_load(bridge.url, tmp_path, stage="4s:3/s:0s"))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(backend.kill)
        outcome = await asyncio.wait_for(run, 90)
    outcomes = _outcomes(outcome)
    failed = {k for k in outcomes if not k.startswith("None:")}
    assert failed, outcomes
    assert failed <= {
        "ai_error:BACKEND_UNAVAILABLE",
        "ai_error:BACKEND_FAILED",
        "ai_error:STREAM_TIMEOUT",
    }, outcomes


async def test_bridge_killed_mid_stream_counts_disconnects(redis_url: str, tmp_path: Path) -> None:
    with services(redis_url, ttft_ms=200, tokens_per_s=10, reply_tokens=30) as (_, bridge):
        run = asyncio.create_task(
            _load(
                bridge.url,
                tmp_path,
                stage="3s:3/s:0s",
                timeouts=Timeouts(ack_s=2, ttft_s=5, stall_s=5, total_s=5, done_s=2),
            )
        )
        await asyncio.sleep(1.5)
        await asyncio.to_thread(bridge.kill)
        outcome = await asyncio.wait_for(run, 60)
    records = outcome.runs[0].records
    in_flight = [r for r in records if r.scheduled_s < 1.0]  # sent, streaming 3 s when killed
    assert in_flight and all(r.failure == "disconnect" for r in in_flight), in_flight
    assert all(r.ttft_ms is not None for r in in_flight)  # they were streaming
    later = {r.failure for r in records if r.scheduled_s > 1.6}
    assert later <= {"disconnect", "unsent"}, later
    assert outcome.summary["targets"]["bridge"]["connections"]["disconnects"] >= 1


async def test_slow_model_flips_the_gate_and_past_the_client_limit_is_a_timeout(
    redis_url: str, tmp_path: Path
) -> None:
    gates = GateSettings(ttft_p95_ms=1000, min_samples=5)
    with services(redis_url, ttft_ms=150) as (_, bridge):
        fast = await _load(bridge.url, tmp_path / "fast", stage="2s:4/s:0s", gates=gates)
    with services(redis_url, ttft_ms=1300) as (_, bridge):
        slow = await _load(bridge.url, tmp_path / "slow", stage="2s:4/s:0s", gates=gates)
        cut = await _load(
            bridge.url,
            tmp_path / "cut",
            stage="2s:4/s:0s",
            gates=gates,
            timeouts=Timeouts(ack_s=5, ttft_s=0.8, stall_s=5, total_s=10, done_s=2),
        )
    assert fast.summary["exitCode"] == ExitCode.PASS, fast.summary["reasons"]
    assert slow.summary["exitCode"] == ExitCode.FAIL
    assert [g["name"] for g in slow.summary["gates"] if not g["ok"]] == ["ttft_p95_ms"]
    assert _outcomes(cut) == {"timeout:None": 8}


async def test_embedded_stack_teardown_leaves_no_process_behind() -> None:
    """Regression: a stack stopped with SIGTERM left its backend and Redis running (orphans)."""
    stack = EmbeddedStack(env={})
    info = await stack.start()
    assert info.bridge_url.startswith("http://127.0.0.1:")
    assert stack.proc is not None
    pgid = stack.proc.pid
    await stack.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
