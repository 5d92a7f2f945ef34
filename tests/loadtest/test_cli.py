"""The command line end to end against the fakes: files written, exit codes, offline recompute."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from loadtest.cli import main
from loadtest.gates import ExitCode
from loadtest.results import read_jsonl, recompute
from tests.loadtest.fakes import SECRET, FakeBackend, FakeBridge, Script, serving


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeBridge, FakeBackend]]:
    bridge, backend = FakeBridge(Script(ttft_s=0.1)), FakeBackend(Script(ttft_s=0.1))
    async with serving(bridge.app, bridge.port), serving(backend.app, backend.port):
        yield bridge, backend
    for task in bridge.tasks:
        task.cancel()


async def _cli(*argv: str) -> int:
    # The CLI runs its own event loop, the fakes live on this one: give the CLI a thread.
    return await asyncio.to_thread(main, list(argv))


def _args(bridge: FakeBridge, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--url",
        bridge.url,
        "--jwt-secret",
        SECRET,
        "--stage",
        "2s:20/s:0s",
        "--users",
        "10",
        "--min-samples",
        "20",
        "--quiet",
        "--arrival",
        "constant",
        "--out",
        str(out),
        "--total-timeout",
        "3s",
        "--done-timeout",
        "1s",
        *extra,
    ]


async def test_run_writes_summary_jsonl_and_html_and_passes(
    fakes: tuple[FakeBridge, FakeBackend], tmp_path: Path
) -> None:
    code = await _cli(*_args(fakes[0], tmp_path))
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert code == ExitCode.PASS and summary["verdict"] == "pass"
    assert summary["targets"]["bridge"]["steady"]["requests"]["ok"] == 40
    html = (tmp_path / "report.html").read_text()
    assert html.count("<svg") == 4 and html.count("<polyline") >= 4
    assert not any(tag in html for tag in ("<script", "<link", "src=", "@import"))
    meta, runs = read_jsonl(tmp_path / "requests.jsonl")
    assert meta.gated_target == "bridge" and len(runs[0].records) == 40


async def test_recomputed_summary_equals_the_runs_summary(
    fakes: tuple[FakeBridge, FakeBackend], tmp_path: Path
) -> None:
    bridge, backend = fakes
    bridge.script.fault, bridge.script.every = "error", 7
    code = await _cli(*_args(bridge, tmp_path, "--direct", backend.url, "--compare"))
    assert code == ExitCode.FAIL  # 1 in 7 failing is over the 1 % gate
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert orjson.loads(orjson.dumps(recompute(tmp_path / "requests.jsonl"))) == summary
    assert summary["comparison"]["ttft.p50"]["direct"] is not None
    check = await _cli(
        "recompute", str(tmp_path / "requests.jsonl"), "--check", str(tmp_path / "summary.json")
    )
    assert check == ExitCode.FAIL  # same verdict, and --check found them equal (else also 1)
    summary["targets"]["bridge"]["steady"]["requests"]["ok"] += 1
    (tmp_path / "tampered.json").write_bytes(orjson.dumps(summary))
    mismatch = await _cli(
        "recompute",
        str(tmp_path / "requests.jsonl"),
        "--check",
        str(tmp_path / "tampered.json"),
        "--gate-failed-rate",
        "0.5",
    )
    assert mismatch == ExitCode.FAIL


async def test_gate_verdict_flips_when_the_threshold_is_crossed(
    fakes: tuple[FakeBridge, FakeBackend], tmp_path: Path
) -> None:
    bridge = fakes[0]
    bridge.script.ttft_s = 0.3
    assert await _cli(*_args(bridge, tmp_path / "a", "--gate-ttft-p95", "2s")) == ExitCode.PASS
    assert await _cli(*_args(bridge, tmp_path / "b", "--gate-ttft-p95", "250ms")) == ExitCode.FAIL
    jsonl = str(tmp_path / "a" / "requests.jsonl")
    assert await _cli("recompute", jsonl, "--gate-ttft-p95", "250ms") == ExitCode.FAIL
    assert await _cli("recompute", jsonl, "--min-samples", "1000") == ExitCode.INCONCLUSIVE


async def test_recompute_gate_override_changes_only_the_gates(
    tmp_path: Path, fakes: tuple[FakeBridge, FakeBackend]
) -> None:
    assert await _cli(*_args(fakes[0], tmp_path)) == ExitCode.PASS
    out = tmp_path / "re.json"
    await _cli(
        "recompute", str(tmp_path / "requests.jsonl"), "--gate-ttft-p95", "1ms", "--json", str(out)
    )
    again = orjson.loads(out.read_bytes())
    original = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert again["verdict"] == "fail" and original["verdict"] == "pass"
    assert (
        again["targets"]["bridge"]["steady"]["metrics"]
        == (original["targets"]["bridge"]["steady"]["metrics"])
    )


def test_usage_errors_exit_4_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--url", "http://127.0.0.1:1", "--quiet"]) == ExitCode.ERROR
    assert "--jwt-secret" in capsys.readouterr().err
    assert main(["run", "--direct", "--quiet"]) == ExitCode.ERROR
    assert main(["run", "--url", "http://x", "--jwt-secret", "s" * 32, "--compare"]) == (
        ExitCode.ERROR
    )


def test_sigterm_during_a_stack_run_tears_the_stack_down(tmp_path: Path) -> None:
    """Regression: ``kill`` (SIGTERM) of ``loadtest run --stack`` left the spawned stack (bridge,
    backend, Redis: its own process group) running; only Ctrl-C tore it down."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    argv = [sys.executable, "-m", "loadtest", "run", "--stack", "--stage", "60s:1/s",
            "--users", "2", "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line or line.startswith("stack up"):
                break
        assert line.startswith("stack up"), line
        stack = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in p.name() for p in stack)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        gone, alive = psutil.wait_procs(stack, timeout=15)
        assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
