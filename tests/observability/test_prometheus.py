"""The dashboard and the alarms on a real Prometheus (Debian's ``prometheus`` and ``promtool``).

- ``promtool check rules`` and ``promtool test rules`` (alerts_test.yaml: each alert fires on a
  synthetic series and stays quiet on a healthy one), and no alert goes without both cases.
- A Prometheus (the one ``python -m bridge stack --prometheus`` runs) scrapes a running bridge
  and backend during a short load; every query of the Grafana dashboard returns data from it,
  and every rule of the chart evaluates without error on the real series.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bridge.prometheus import RULES, LocalPrometheus
from tests.bridge.harness import connected, new_id
from tests.integration.conftest import BACKEND_TOKEN, bridge_env
from tests.support.backend import fast_backend_env
from tests.support.procs import ServerProcess

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="Debian's prometheus is installed by dev.sh test"
)

HERE = Path(__file__).parent
DASHBOARD = RULES.parents[1] / "grafana" / "dashboard.json"
COMPLETE_USER = "observability-complete-user"
RATE_INTERVAL = "1m"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=HERE)


def test_the_rules_are_valid() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_alarm_fires_on_a_bad_series_and_stays_quiet_on_a_healthy_one() -> None:
    done = _promtool("test", "rules", "alerts_test.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load((HERE / "alerts_test.yaml").read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert alerts and alerts == fires == quiet


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", RATE_INTERVAL))
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def test_the_dashboard_uses_only_metrics_the_contract_names() -> None:
    # CONTRACT.md section 6, plus the bridge's rejection counter the failed-sends gate needs
    contract = (Path(__file__).parents[2] / ".." / "shared" / "CONTRACT.md").resolve()
    named = contract.read_text() if contract.exists() else ""
    for title, expr in _dashboard_queries():
        for metric in {w for w in _words(expr) if w.startswith(("bridge_", "backend_"))}:
            base = metric.removesuffix("_bucket")
            assert base in named or base == "bridge_rejections_total", (title, metric)


def _words(expr: str) -> set[str]:
    word, found = "", set()
    for ch in expr + " ":
        if ch.isalnum() or ch == "_":
            word += ch
        else:
            if word:
                found.add(word)
            word = ""
    return found


@pytest.fixture
def scraped_stack(redis_url: str) -> Iterator[tuple[str, LocalPrometheus]]:
    with ServerProcess.python_module(
        "backend_stream", env=fast_backend_env(redis_url, BACKEND_TOKEN)
    ) as backend:
        env = {**bridge_env(redis_url, backend), "CHAT_STREAMING_DENY_USERS": COMPLETE_USER}
        with ServerProcess.python_module("bridge", env=env) as bridge:
            targets = {
                "chat-bridge": f"127.0.0.1:{bridge.port}",
                "chat-backend": f"127.0.0.1:{backend.port}",
            }
            with LocalPrometheus(targets, interval_s=1.0) as prometheus:
                prometheus.wait_scraping()
                yield bridge.url, prometheus


async def _one(url: str, user: str, content: str, *, timing: bool = False) -> None:
    room, rid = new_id("room"), new_id("req")
    async with connected(url, user) as client:
        assert (await client.call("join_room", {"roomId": room}))["ok"] is True
        payload = {"roomId": room, "content": content, "requestId": rid}
        assert (await client.call("send_message", payload))["ok"] is True
        await client.wait_for("message_ack", wait_s=20)
        if timing:
            report = {
                "requestId": rid, "sentAt": 1.7e12, "startMs": 40.0, "firstChunkMs": 80.0,
                "endMs": 400.0,
            }  # fmt: skip
            assert (await client.call("client_timing", report))["ok"] is True


async def _load(url: str) -> None:
    """Normal streams, one on the complete path, one whose stream breaks (fallback, error)."""
    jobs = [_one(url, new_id("user"), f"hello {i}", timing=i < 3) for i in range(12)]
    jobs.append(_one(url, COMPLETE_USER, "the complete path"))
    jobs.append(_one(url, new_id("user"), "[[fail_after=3]] a broken stream"))
    await asyncio.gather(*jobs)


def _query(prometheus: LocalPrometheus, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=10)
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _has_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    scraped_stack: tuple[str, LocalPrometheus],
) -> None:
    url, prometheus = scraped_stack
    await _load(url)
    await asyncio.sleep(3.5)  # a few scrapes after the load
    await _load(url)
    queries = _dashboard_queries()
    assert len(queries) >= 10
    missing: list[str] = []
    for _ in range(20):
        missing = [
            f"{title}: {expr}"
            for title, expr in queries
            if not _has_value(_query(prometheus, expr))
        ]
        if not missing:
            break
        await asyncio.sleep(1.0)
    assert not missing, "queries without data:\n" + "\n".join(missing)
    # the P0 figures are the real ones: TTFT p95 by path, for both paths that carried traffic
    rate = f"rate(bridge_ttft_seconds_bucket[{RATE_INTERVAL}])"
    p95 = _query(prometheus, f"histogram_quantile(0.95, sum by (le, path) ({rate}))")
    assert {series["metric"]["path"] for series in p95} >= {"stream", "fallback"}
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"{prometheus.url}/api/v1/rules", timeout=10)
    rules = reply.json()["data"]["groups"]
    evaluated = [rule for group in rules for rule in group["rules"]]
    assert len(evaluated) >= 10
    assert all(rule["health"] == "ok" for rule in evaluated), [
        (rule["name"], rule.get("lastError")) for rule in evaluated if rule["health"] != "ok"
    ]
