"""The operator page (GET /admin) in a real headless Chromium against a real stack (issue 10).

A private Redis, the backend (scripted model), one bridge judging its rollout every half second
on Debian's ``prometheus`` scraping it every second, and a steady load from real Socket.IO
clients (tests/integration/test_rollout.py's ``Load``). The page is driven by
tests/e2e/admin_page.mjs; when it says so, the load switches to content that makes the stream
path fail, and the page must show the rollback and the gate that caused it.

Screenshots: /tmp/admin-running.png, /tmp/admin-rolled-back.png, /tmp/admin-unauthorized.png
(``ADMIN_SCREENSHOT_DIR`` moves them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.flags import bucket
from bridge.prometheus import LocalPrometheus
from contracts.redis_server import EmbeddedRedis
from tests.bridge.harness import FAST_ENV, token
from tests.e2e import pages
from tests.e2e.node import HERE, NODE_MODULES
from tests.integration.test_rollout import FAILING, Load, pick_users
from tests.support.backend import fast_backend_env
from tests.support.procs import ServerProcess, free_port

pytestmark = pytest.mark.e2e

BACKEND_TOKEN = "admin-page-backend-token"
EVAL_S = 0.5
SHOTS = Path(os.environ.get("ADMIN_SCREENSHOT_DIR", "/tmp"))
# dwell passes after 2 s; a gate passes only with 300 samples in each cohort (the complete
# cohort's two users need a minute for them: the page is done with the running stage in a few
# seconds) and fails with a tenth of them: p95_ttft has a number and waits, and the first
# failures roll back (failed_sends, or the breaker when it opened in the same scrape)
START = {"plan": [10, 50, 100], "dwellS": 2, "minSamples": 300, "reason": "e2e: page drill"}
# stream users are those below 10 %, complete ones above: both cohorts have traffic
STREAMED, COMPLETE = 4, 2


@dataclass
class Stack:
    url: str
    prometheus: LocalPrometheus


@pytest.fixture(scope="module")
def stack(node_modules: None) -> Iterator[Stack]:
    assert (NODE_MODULES / "playwright-core").exists(), "run npm ci in tests/e2e"
    port = free_port()
    with (
        EmbeddedRedis() as redis,
        ServerProcess.python_module(
            "backend_stream", env=fast_backend_env(redis.url, BACKEND_TOKEN)
        ) as backend,
        LocalPrometheus({"bridge": f"127.0.0.1:{port}"}, interval_s=1.0, rules=None) as prom,
    ):
        env = {
            **FAST_ENV,
            "BACKEND_URL": backend.url,
            "BACKEND_TOKEN": BACKEND_TOKEN,
            "REDIS_URL": redis.url,
            "BRIDGE_FIRST_CHUNK_TIMEOUT_S": "5",
            "BRIDGE_IDLE_TIMEOUT_S": "5",
            "PROMETHEUS_URL": prom.url,
            "BRIDGE_ROLLOUT_EVAL_S": str(EVAL_S),
            "CHAT_STREAMING_PERCENT": "0",
        }
        with ServerProcess.python_module("bridge", port=port, env=env) as bridge:
            prom.wait_scraping()
            yield Stack(bridge.url, prom)


def _users() -> list[str]:
    users = pick_users()  # four per bucket range: [0:4] below 10 %, [4:8] 10..25 %
    streamed, complete = users[:STREAMED], users[4 : 4 + COMPLETE]
    assert all(bucket(u) < 1000 for u in streamed) and all(bucket(u) >= 1000 for u in complete)
    return streamed + complete


async def _drive(spec: dict[str, Any], load: Load, timeout_s: float = 150) -> list[dict[str, Any]]:
    """Run admin_page.mjs; when it signals ``fail``, the load's content makes streams fail."""
    node = shutil.which("node")
    assert node is not None, "node is required for the e2e tests"
    records: list[dict[str, Any]] = []
    with tempfile.NamedTemporaryFile("w", suffix=".json") as fh:  # removed when closed
        json.dump(spec, fh)
        fh.flush()
        proc = await asyncio.create_subprocess_exec(
            node, str(HERE / "admin_page.mjs"), fh.name, cwd=HERE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        code, errors = await _follow(proc, records, load, timeout_s)
    assert code == 0, f"admin_page.mjs failed ({code}): {records[-4:]}\n{errors}"
    return records


async def _follow(
    proc: asyncio.subprocess.Process, records: list[dict[str, Any]], load: Load, timeout_s: float
) -> tuple[int, str]:
    """The script's records as they come, its exit code and stderr."""
    try:
        async with asyncio.timeout(timeout_s):
            assert proc.stdout is not None and proc.stderr is not None
            stderr = asyncio.create_task(proc.stderr.read())
            async for raw in proc.stdout:
                line = raw.decode()
                if not line.startswith("{"):
                    continue
                record = json.loads(line)
                records.append(record)
                if record["kind"] == "signal" and record["name"] == "fail":
                    load.content = FAILING
            code = await proc.wait()
            errors = (await stderr).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return code, errors


def _size(path: str) -> int:
    return Path(path).stat().st_size


def _one(records: list[dict[str, Any]], kind: str, label: str | None = None) -> dict[str, Any]:
    (record,) = [r for r in records if r["kind"] == kind and r.get("label", label) == label]
    return record


def _gates(snap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["name"]: g for g in snap["gates"]}


async def test_operator_page_shows_a_running_rollout_its_gates_and_its_rollback(
    stack: Stack,
) -> None:
    chromium = pages.chromium()
    admin = token("ops-dana", ["admin"])
    spec: dict[str, Any] = {
        "url": stack.url, "chromium": chromium, "token": admin, "badToken": "not-a-jwt",
        "clientToken": token("just-a-user"), "start": START,
        "screenshots": {
            "running": str(SHOTS / "admin-running.png"),
            "rolledBack": str(SHOTS / "admin-rolled-back.png"),
            "unauthorized": str(SHOTS / "admin-unauthorized.png"),
        },
    }  # fmt: skip
    load = Load((stack.url, stack.url), _users())
    async with load.running():
        records = await _drive(spec, load)

    # refused tokens: the API's message on the page, nothing else loaded
    bad = _one(records, "refused", "bad")["snapshot"]
    assert (bad["conn"]["status"], bad["conn"]["code"]) == ("401", "UNAUTHORIZED"), bad["conn"]
    assert bad["conn"]["text"].startswith("401 UNAUTHORIZED: ") and bad["state"] == ""
    assert not any(bad["buttons"].values())
    client = _one(records, "refused", "client")["snapshot"]
    assert (client["conn"]["status"], client["conn"]["code"]) == ("403", "FORBIDDEN")
    assert "the admin role is required" in client["conn"]["text"]
    assert "token" not in client["href"] and client["stored"]  # out of the URL, in the session

    signed = _one(records, "signedIn")["snapshot"]
    assert signed["conn"]["state"] == "ok" and "ops-dana" in signed["conn"]["text"]
    assert signed["state"] == "idle" and signed["buttons"]["start"]
    assert not signed["buttons"]["promote"] and signed["flags"]["percent"] == "0"

    started = _one(records, "started")["snapshot"]
    assert started["notice"]["state"] == "ok", started["notice"]
    assert (started["state"], started["stage"], started["percent"]) == ("running", 0, 10)
    assert started["auto"] == "true" and started["plan"] == "10 % → 50 % → 100 %"
    assert [s["state"] for s in started["stages"]] == ["current", "next", "next"]
    assert started["since"] is not None and started["buttons"]["promote"]

    # the running stage judged on Prometheus: values, samples, verdicts, coloured
    running = _one(records, "gates")["snapshot"]
    assert running["flags"]["percent"] == "10"
    assert "internal" in running["flags"]["allowRoles"]  # the first stage: internal accounts
    entry = running["audit"][0]
    assert (entry["action"], entry["actor"]) == ("start", "ops-dana")
    assert entry["reason"] == START["reason"]
    assert entry["change"] == "idle · 0 % → running · stage 1 · 10 %"
    gates = _gates(running)
    assert list(gates) == [
        "dwell", "p95_ttft", "p95_ttft_vs_complete", "p95_completion", "failed_sends",
        "relay_faults", "breaker",
    ]  # fmt: skip
    ttft = gates["p95_ttft"]
    assert ttft["verdict"] == "wait" and ttft["verdictText"] == "wait"
    assert 0 < ttft["value"] <= 1.5 and re.fullmatch(r"[\d.]+ s", ttft["valueText"]), ttft
    assert 0 < ttft["samples"] < START["minSamples"]
    assert (ttft["threshold"], ttft["thresholdText"]) == (1.5, "≤ 1.5 s")
    assert gates["dwell"]["verdict"] == "pass" and gates["dwell"]["value"] >= START["dwellS"]
    assert gates["failed_sends"]["thresholdText"] == "≤ 1 %"
    assert gates["dwell"]["color"] != ttft["color"]  # pass and wait look different
    assert gates["dwell"]["background"] != ttft["background"]
    assert running["breakers"] and running["breakers"][0]["state"] == "closed"

    # promote while gates wait: the API's 409 and its message on the page, nothing changed
    refused = _one(records, "promote")["snapshot"]
    notice = refused["notice"]
    assert (notice["state"], notice["status"], notice["code"]) == ("error", "409", "FORBIDDEN")
    assert notice["text"].startswith("promote: 409 FORBIDDEN: promote: gates do not pass (")
    assert "p95_ttft wait" in notice["text"], notice
    assert (refused["state"], refused["stage"]) == ("running", 0)
    assert refused["audit"][0]["action"] == "start"  # a refused promote is not a change

    # the stream path fails: the controller rolls back, the page shows it and names the gate
    rolled = _one(records, "rolledBack")
    after = rolled["snapshot"]
    assert (after["state"], after["stateText"], after["percent"]) == (
        "rolled_back", "rolled back", 0
    )  # fmt: skip
    assert after["stages"][0]["state"] == "current" and after["flags"]["percent"] == "0"
    (rollback,) = [r for r in after["audit"] if r["action"] == "rollback"]
    assert rollback["actor"].startswith("controller:"), rollback
    assert rollback["gate"] in ("failed_sends", "breaker"), rollback
    assert rollback["gateText"] == rollback["gate"] and rollback["gate"] in rollback["reason"]
    assert rollback["change"] == "running · stage 1 · 10 % → rolled_back · stage 1 · 0 %"
    assert after["history"][0]["action"] == "rollback" and after["history"][0]["gate"]
    assert after["gates"] == []  # nothing is judged any more
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        headers = {"Authorization": f"Bearer {admin}"}
        audit = (await http.get("/admin/audit?limit=10", headers=headers)).json()
    (api_rollback,) = [e for e in audit if e["action"] == "rollback"]
    assert (api_rollback["gate"], api_rollback["reason"]) == (rollback["gate"], rollback["reason"])
    print(
        f"operator page: rolled back {rolled['afterMs'] / 1000:.1f}s after the stream path "
        f"began to fail, gate {rollback['gate']} ({rollback['reason']})"
    )

    killed = _one(records, "killed")
    entry = killed["snapshot"]["audit"][0]
    assert (entry["action"], entry["actor"], entry["reason"]) == (
        "flags", "ops-dana", "drill: kill switch"
    )  # fmt: skip
    assert entry["change"] == "enabled=true → enabled=false"
    assert [d["type"] for d in killed["dialogs"]] == ["confirm"]
    assert _one(records, "enabled")["snapshot"]["audit"][0]["change"] == (
        "enabled=false → enabled=true"
    )
    reloaded = _one(records, "reloaded")["snapshot"]
    assert reloaded["conn"]["state"] == "ok" and reloaded["state"] == "rolled_back"

    for record in records:
        if "snapshot" in record:
            assert record["snapshot"]["csp"] == [], record
    assert _one(records, "pageErrors")["errors"] == []
    assert all(_size(shot) > 10_000 for shot in spec["screenshots"].values())


async def test_admin_page_is_served_locked_down_and_admin_routes_stay_the_api(
    stack: Stack,
) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        page = await http.get("/admin")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["cache-control"] == "no-cache"
        assert "<script>" not in page.text and "style=" not in page.text  # nothing inline
        refs = dict(re.findall(r'"/static/([\w.-]+)\?v=(\w+)"', page.text))
        assert set(refs) == {"app.css", "admin.css", "admin.js"}
        for name, version in refs.items():
            asset = await http.get(f"/static/{name}?v={version}")
            assert asset.status_code == 200
            assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert (await http.get("/static/admin.html")).status_code == 404  # one name only
        assert (await http.post("/admin")).status_code == 405
        # everything under /admin/ is still the JSON API
        for method, path in [
            ("GET", "/admin/flags"), ("PATCH", "/admin/flags"), ("GET", "/admin/rollout"),
            ("POST", "/admin/rollout/promote"), ("GET", "/admin/audit"), ("GET", "/admin/"),
        ]:  # fmt: skip
            reply = await http.request(method, path)
            assert reply.status_code == 401, (method, path, reply.text)
            assert reply.headers["content-type"] == "application/json"
            assert reply.json()["code"] == "UNAUTHORIZED"
        admin = {"Authorization": f"Bearer {token('ops-erin', ['admin'])}"}
        flags = await http.get("/admin/flags", headers=admin)
        assert flags.status_code == 200 and "enabled" in flags.json()
