"""The runner and both targets against in-process fakes: measurement and failure classification."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest

from loadtest.record import Timeouts
from loadtest.runner import Runner, RunSettings, TargetRun
from loadtest.schedule import ArrivalKind, Stage, build_schedule
from loadtest.socketio_target import SocketIoSettings, SocketIoTarget
from loadtest.sse_target import SseSettings, SseTarget
from loadtest.stats import distribution, metric_values
from loadtest.tokens import mint_users
from tests.loadtest.fakes import SECRET, FakeBackend, FakeBridge, Script, serving
from tests.support.procs import free_port

FAST = Timeouts(ack_s=1.0, ttft_s=2.0, stall_s=0.4, total_s=3.0, done_s=0.5)


async def _run(
    target: SocketIoTarget | SseTarget,
    *,
    rate: float = 20.0,
    seconds: float = 1.0,
    users: int = 10,
    secret: str = SECRET,
    max_in_flight: int | None = None,
    timeouts: Timeouts = FAST,
) -> TargetRun:
    schedule = build_schedule(
        [Stage(duration_s=seconds, rate_per_s=rate, ramp_s=0)], kind=ArrivalKind.CONSTANT
    )
    runner = Runner(
        target,
        schedule,
        mint_users(secret, users, run_id="t"),
        RunSettings(max_in_flight=max_in_flight or users, timeouts=timeouts, start_delay_s=0.1),
        run_id="t",
    )
    return await runner.run()


@pytest.fixture
async def bridge() -> AsyncIterator[FakeBridge]:
    fake = FakeBridge(Script())
    async with serving(fake.app, fake.port):
        yield fake
        fake.release.set()
    for task in fake.tasks:
        task.cancel()


@pytest.fixture
async def backend() -> AsyncIterator[FakeBackend]:
    fake = FakeBackend(Script())
    async with serving(fake.app, fake.port):
        yield fake


def _sio(url: str) -> SocketIoTarget:
    return SocketIoTarget(url, SocketIoSettings(prompt="hi"))


async def test_latencies_reflect_the_servers_ttft_and_chunk_pacing(bridge: FakeBridge) -> None:
    bridge.script.ttft_s, bridge.script.gap_s = 0.2, 0.03
    run = await _run(_sio(bridge.url))
    assert len(run.records) == 20 and all(r.ok for r in run.records)
    ttft = distribution(metric_values(run.records, "ttft"))
    completion = distribution(metric_values(run.records, "completion"))
    assert 195 <= ttft["p50"] <= 400
    assert 280 <= completion["p50"] <= 500  # TTFT + 3 gaps of 30 ms
    gaps = distribution(metric_values(run.records, "gap"))
    assert gaps["n"] == 60 and 25 <= gaps["p50"] <= 120
    assert {r.path for r in run.records} == {"stream"}
    assert all(r.correctness_violations() == 0 for r in run.records)
    assert len(run.connect.connect_ms) == 10 and run.cpu_process_s > 0


@pytest.mark.parametrize(
    ("fault", "field"),
    [
        ("dup", "duplicates"),
        ("gap", "seq_gaps"),
        ("reorder", "out_of_order"),
        ("mismatch", "content_mismatch"),
    ],
)
async def test_correctness_violations_are_counted_per_request(
    bridge: FakeBridge, fault: str, field: str
) -> None:
    bridge.script.fault, bridge.script.every = fault, 2
    run = await _run(_sio(bridge.url))
    flagged = [r.index for r in run.records if getattr(r, field)]
    assert flagged == list(range(0, 20, 2))
    assert all(r.ok for r in run.records)


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ("error", "ai_error:MODEL_ERROR"),
        ("reject", "rejected:RATE_LIMITED"),
        ("stall", "stall:None"),
        ("cut", "disconnect:None"),
    ],
)
async def test_faults_land_in_their_failure_class(
    bridge: FakeBridge, fault: str, outcome: str
) -> None:
    bridge.script.fault, bridge.script.every = fault, 4
    run = await _run(_sio(bridge.url))
    failed = Counter(f"{r.failure}:{r.code}" for r in run.records if not r.ok)
    assert failed == {outcome: 5}
    assert len(run.records) == 20


async def test_cut_connections_reconnect_and_later_requests_succeed(bridge: FakeBridge) -> None:
    bridge.script.fault, bridge.script.every = "cut", 10
    run = await _run(_sio(bridge.url), seconds=3.0)
    assert run.connect.disconnects >= 1 and run.connect.reconnects >= 1
    assert sum(1 for r in run.records if r.ok) >= 50


async def test_missing_ack_is_an_ack_timeout(bridge: FakeBridge) -> None:
    bridge.script.no_ack = True
    run = await _run(_sio(bridge.url), rate=5.0)
    assert {r.failure for r in run.records} == {"ack_timeout"}


async def test_missing_done_ack_is_a_violation_not_a_failure(bridge: FakeBridge) -> None:
    bridge.script.no_done = True
    run = await _run(_sio(bridge.url), rate=5.0)
    assert all(r.ok and r.missing_done for r in run.records)


async def test_complete_path_times_the_assistant_message(bridge: FakeBridge) -> None:
    bridge.script.path, bridge.script.ttft_s = "complete", 0.15
    run = await _run(_sio(bridge.url), rate=5.0)
    assert {r.path for r in run.records} == {"complete"}
    assert all(r.ok and r.ttft_ms is not None and r.ttft_ms >= 150 for r in run.records)


async def test_refused_connections_are_counted_and_requests_reported_unsent(
    bridge: FakeBridge,
) -> None:
    run = await _run(
        _sio(bridge.url),
        rate=5.0,
        secret="wrong-secret-0123456789abcdef-0123456789",
        timeouts=Timeouts(total_s=0.5, ack_s=0.5),
    )
    assert run.connect.failures == {"UNAUTHORIZED": 10}
    assert len(run.records) == 5 and {r.failure for r in run.records} == {"unsent"}


async def test_waiting_for_a_free_connection_counts_in_latency(bridge: FakeBridge) -> None:
    bridge.script.ttft_s = 0.3
    run = await _run(_sio(bridge.url), rate=10.0, users=2)
    waited = [r for r in run.records if (r.slot_wait_ms or 0) > 50]
    assert waited, "with 2 connections and 10/s x 0.3 s some requests must wait"
    for r in waited:
        assert r.ttft_ms is not None and r.ttft_ms >= 300 + (r.slot_wait_ms or 0) - 5


async def test_direct_sse_target_measures_and_classifies(backend: FakeBackend) -> None:
    backend.script.ttft_s = 0.2
    backend.script.fault, backend.script.every = "cut", 5
    run = await _run(SseTarget(backend.url, SseSettings(prompt="hi")))
    outcomes = Counter(r.failure for r in run.records)
    assert outcomes == {None: 16, "disconnect": 4}
    ttft = distribution(metric_values([r for r in run.records if r.ok], "ttft"))
    assert 195 <= ttft["p50"] <= 400
    assert all(r.done_ms is None and not r.missing_done for r in run.records)


@pytest.mark.parametrize(
    ("fault", "outcome"), [("reject", "rejected:RATE_LIMITED"), ("error", "ai_error:MODEL_ERROR")]
)
async def test_direct_errors_keep_their_codes(
    backend: FakeBackend, fault: str, outcome: str
) -> None:
    backend.script.fault = fault
    run = await _run(SseTarget(backend.url, SseSettings(prompt="hi")), rate=5.0)
    assert Counter(f"{r.failure}:{r.code}" for r in run.records) == {outcome: 5}


async def test_direct_backend_down_is_a_connect_failure() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    run = await _run(SseTarget(url, SseSettings(prompt="hi")), rate=5.0)
    assert Counter(f"{r.failure}:{r.code}" for r in run.records) == {"rejected:CONNECT_FAILED": 5}
