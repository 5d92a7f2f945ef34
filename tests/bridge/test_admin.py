"""The operators' API (CONTRACT.md section 4): auth, bad bodies, transitions, audit.

A real bridge (uvicorn on loopback) on a real Redis; no Prometheus here, so every data gate
waits (tests/integration/test_rollout.py judges gates on a real one).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from bridge.auth import make_token
from bridge.flags import AUDIT_KEY, FLAGS_KEY
from bridge.rollout import LEASE_KEY, ROLLOUT_KEY
from contracts.admin import RolloutView
from tests.bridge.harness import JWT_SECRET, running_bridge, token

ADMIN = {"Authorization": f"Bearer {token('ops-alice', ['admin'])}"}
KEYS = (FLAGS_KEY, AUDIT_KEY, ROLLOUT_KEY, LEASE_KEY)


@pytest.fixture
async def api(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.delete(*KEYS)
    env = {"CHAT_STREAMING_PERCENT": "0", "BRIDGE_ROLLOUT_EVAL_S": "0.2"}
    try:
        async with (
            running_bridge(redis_url, "http://127.0.0.1:9", "unused", env) as running,
            httpx.AsyncClient(base_url=running.url, timeout=5.0) as client,
        ):
            yield client
    finally:
        await redis.delete(*KEYS)
        await redis.aclose()


async def _state(api: httpx.AsyncClient) -> tuple[Any, Any, Any]:
    flags = (await api.get("/admin/flags", headers=ADMIN)).json()
    rollout = (await api.get("/admin/rollout", headers=ADMIN)).json()
    audit = (await api.get("/admin/audit", headers=ADMIN)).json()
    return flags, rollout, audit


AUTH_CASES = {
    "no token": {},
    "not a bearer": {"Authorization": "Basic b3BzOm9wcw=="},
    "expired admin": {"Authorization": f"Bearer {token('ops', ['admin'], ttl_s=-30)}"},
    "forged admin": {
        "Authorization": f"Bearer {make_token('another-secret-0123456789abcdef-xyz', 'ops', roles=['admin'])}"  # noqa: E501
    },
    "garbage": {"Authorization": "Bearer not.a.jwt"},
}


@pytest.mark.parametrize("case", sorted(AUTH_CASES))
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/flags", None),
        ("PATCH", "/admin/flags", {"enabled": False}),
        ("GET", "/admin/rollout", None),
        ("POST", "/admin/rollout/start", {"auto": True}),
        ("GET", "/admin/audit", None),
    ],
)
async def test_without_a_valid_admin_token_401_and_nothing_changes(
    api: httpx.AsyncClient, case: str, method: str, path: str, body: Any
) -> None:
    before = await _state(api)
    reply = await api.request(method, path, json=body, headers=AUTH_CASES[case])
    assert reply.status_code == 401, reply.text
    assert reply.json()["code"] == "UNAUTHORIZED"
    assert await _state(api) == before


async def test_a_client_token_is_403(api: httpx.AsyncClient) -> None:
    before = await _state(api)
    for roles in ([], ["internal"]):
        headers = {"Authorization": f"Bearer {token('user-bob', roles)}"}
        for method, path, body in [
            ("GET", "/admin/flags", None),
            ("PATCH", "/admin/flags", {"enabled": False}),
            ("POST", "/admin/rollout/start", {}),
        ]:
            reply = await api.request(method, path, json=body, headers=headers)
            assert reply.status_code == 403, reply.text
            assert reply.json()["code"] == "FORBIDDEN"
    assert await _state(api) == before


BAD_FLAGS = [
    {"percent": 101},
    {"percent": -1},
    {"percent": "50"},
    {"percent": True},
    {"enabled": 1},
    {"enabled": "false"},
    {"fallback": None, "reason": 5},
    {"allowUsers": "alice"},
    {"allowUsers": ["ok", "not ok!"]},
    {"denyUsers": [1, 2]},
    {"reason": "x" * 501, "enabled": True},
    {},
    {"unknownFlag": True},
    [{"enabled": False}],
]
BAD_STARTS = [
    {"plan": [10, 250]},
    {"plan": [50, 25, 100]},
    {"plan": [0, 50]},
    {"plan": []},
    {"plan": ["ten"]},
    {"plan": "10,25"},
    {"auto": "yes"},
    {"dwellS": -1},
    {"minSamples": 0},
    {"minSamples": 2.5},
]


@pytest.mark.parametrize("body", BAD_FLAGS, ids=[repr(b)[:40] for b in BAD_FLAGS])
async def test_bad_flag_bodies_422_with_a_code_and_nothing_changes(
    api: httpx.AsyncClient, body: Any
) -> None:
    before = await _state(api)
    reply = await api.patch("/admin/flags", json=body, headers=ADMIN)
    assert reply.status_code == 422, reply.text
    assert reply.json()["code"] == "INVALID_PAYLOAD"
    assert reply.json()["message"]
    assert await _state(api) == before


@pytest.mark.parametrize("body", BAD_STARTS, ids=[repr(b)[:40] for b in BAD_STARTS])
async def test_bad_start_bodies_422_and_no_rollout(api: httpx.AsyncClient, body: Any) -> None:
    before = await _state(api)
    reply = await api.post("/admin/rollout/start", json=body, headers=ADMIN)
    assert reply.status_code == 422, reply.text
    assert reply.json()["code"] == "INVALID_PAYLOAD"
    assert await _state(api) == before


async def test_not_json_400_unknown_route_404_wrong_method_405(api: httpx.AsyncClient) -> None:
    before = await _state(api)
    for path, method in [("/admin/flags", "PATCH"), ("/admin/rollout/start", "POST")]:
        reply = await api.request(method, path, content=b"{not json", headers=ADMIN)
        assert reply.status_code == 400, reply.text
        assert reply.json()["code"] == "INVALID_PAYLOAD"
    reply = await api.post("/admin/rollout/explode", json={}, headers=ADMIN)
    assert (reply.status_code, reply.json()["code"]) == (404, "NOT_FOUND")
    reply = await api.get("/admin/nothing", headers=ADMIN)
    assert reply.status_code == 404
    reply = await api.delete("/admin/flags", headers=ADMIN)
    assert reply.status_code == 405
    reply = await api.get("/admin/audit?limit=0", headers=ADMIN)
    assert (reply.status_code, reply.json()["code"]) == (422, "INVALID_PAYLOAD")
    assert await _state(api) == before


async def test_patch_flags_is_applied_and_audited_with_actor_and_reason(
    api: httpx.AsyncClient,
) -> None:
    reply = await api.patch(
        "/admin/flags",
        json={"percent": 25, "denyUsers": ["mallory"], "reason": "ramp"},
        headers=ADMIN,
    )
    assert reply.status_code == 200, reply.text
    flags = reply.json()
    assert flags["percent"] == 25 and flags["denyUsers"] == ["mallory"]
    assert flags["defaults"]["percent"] == 0
    (entry,) = (await api.get("/admin/audit", headers=ADMIN)).json()
    assert entry["actor"] == "ops-alice" and entry["action"] == "flags"
    assert entry["before"] == {"percent": 0.0, "denyUsers": []}
    assert entry["after"] == {"percent": 25.0, "denyUsers": ["mallory"]}
    assert entry["reason"] == "ramp" and entry["at"]


async def test_transitions_follow_the_state_machine_and_are_audited(
    api: httpx.AsyncClient,
) -> None:
    async def post(action: str, body: Any = None, status: int = 200) -> Any:
        reply = await api.post(f"/admin/rollout/{action}", json=body or {}, headers=ADMIN)
        assert reply.status_code == status, (action, reply.text)
        return reply.json()

    view = (await api.get("/admin/rollout", headers=ADMIN)).json()
    RolloutView.model_validate(view)
    assert (view["state"], view["stage"], view["gates"]) == ("idle", -1, [])
    for action in ("promote", "pause", "resume", "rollback"):
        assert (await post(action, status=409))["code"] == "FORBIDDEN"

    view = await post("start", {"plan": [5, 50, 100], "dwellS": 0, "minSamples": 3})
    RolloutView.model_validate(view)
    assert (view["state"], view["stage"], view["percent"], view["plan"]) == (
        "running", 0, 5, [5, 50, 100]
    )  # fmt: skip
    flags = (await api.get("/admin/flags", headers=ADMIN)).json()
    assert flags["percent"] == 5 and {"internal", "admin"} <= set(flags["allowRoles"])
    assert {g["name"] for g in view["gates"]} >= {"p95_ttft", "failed_sends", "dwell"}
    # no Prometheus: no data is "wait", never "pass"; promote is refused, naming the gates
    assert all(g["verdict"] == "wait" for g in view["gates"] if g["name"] != "dwell")
    assert (await post("start", status=409))["code"] == "FORBIDDEN"
    refused = await post("promote", {"reason": "looks fine"}, status=409)
    assert "p95_ttft wait" in refused["message"] and refused["gates"]

    assert (await post("pause"))["state"] == "paused"
    await post("promote", status=409)
    assert (await post("resume"))["state"] == "running"
    view = await post("promote", {"force": True, "reason": "on call says so"})
    assert (view["stage"], view["percent"]) == (1, 50)
    assert (await api.get("/admin/flags", headers=ADMIN)).json()["percent"] == 50
    view = await post("rollback", {"reason": "test"})
    assert (view["state"], view["percent"]) == ("rolled_back", 5)
    assert (await api.get("/admin/flags", headers=ADMIN)).json()["percent"] == 5
    await post("rollback", status=409)

    audit = (await api.get("/admin/audit?limit=10", headers=ADMIN)).json()
    actions = [e["action"] for e in audit]
    assert actions == ["rollback", "promote", "resume", "pause", "start"]
    promote = audit[1]
    assert promote["forced"] is True and promote["reason"] == "on call says so"
    assert promote["before"]["stage"] == 0 and promote["after"]["stage"] == 1
    assert all(e["actor"] == "ops-alice" for e in audit)
    assert [h["action"] for h in view["history"]] == actions[::-1]


async def _cli(url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m bridge ARGS --url URL`` in a child process (the bridge serves this loop)."""
    environ = {**os.environ, "JWT_SECRET": JWT_SECRET, **(env or {})}
    environ.pop("BRIDGE_ADMIN_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, "--url", url, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_cli_is_a_client_of_the_api_and_its_changes_are_audited(
    api: httpx.AsyncClient,
) -> None:
    url = str(api.base_url).rstrip("/")
    code, out, err = await _cli(url, "rollout", "status")
    assert code == 0, err
    assert json.loads(out)["state"] == "idle"
    code, out, err = await _cli(
        url, "rollout", "start", "--plan", "10,100", "--dwell-s", "0", "--min-samples", "5",
        "--reason", "from the cli", "--actor", "ops-dave",
    )  # fmt: skip
    assert code == 0, err
    assert (json.loads(out)["state"], json.loads(out)["percent"]) == ("running", 10)
    code, out, err = await _cli(url, "rollout", "promote")  # gates wait: refused
    assert code == 1 and "409 FORBIDDEN" in err and "wait" in err
    code, out, err = await _cli(url, "rollout", "promote", "--force", "--reason", "drill")
    assert code == 0, err
    assert json.loads(out)["state"] == "done"
    code, out, err = await _cli(url, "flags", "set", "enabled=false", "--reason", "kill")
    assert code == 0, err
    assert json.loads(out)["enabled"] is False
    code, out, err = await _cli(url, "flags", "reset")
    assert code == 0, err
    assert json.loads(out)["enabled"] is True and json.loads(out)["percent"] == 0
    audit = (await api.get("/admin/audit", headers=ADMIN)).json()
    assert [(e["action"], e["actor"].split(":")[0]) for e in audit] == [
        ("flags", "cli"), ("flags", "cli"), ("promote", "cli"), ("start", "ops-dave")
    ]  # fmt: skip
    assert audit[1]["reason"] == "kill" and audit[2]["forced"] is True


async def test_cli_refusals_exit_non_zero_with_the_reason(api: httpx.AsyncClient) -> None:
    url = str(api.base_url).rstrip("/")
    before = await _state(api)
    code, _, err = await _cli(url, "flags", "set", "percent=101")
    assert code == 2 and "percent" in err
    code, _, err = await _cli(url, "flags", "set", "nonsense=1")
    assert code == 2 and "unknown flag" in err
    code, _, err = await _cli(url, "rollout", "start", "--plan", "10,abc")
    assert code == 2 and "--plan" in err
    code, _, err = await _cli(url, "rollout", "start", "--plan", "50,10")
    assert code == 1 and "422 INVALID_PAYLOAD" in err
    code, _, err = await _cli(url, "flags", "show", "--token", token("user-eve"))
    assert code == 1 and "403 FORBIDDEN" in err
    code, _, err = await _cli(url, "flags", "show", env={"JWT_SECRET": ""})
    assert code == 2 and "no admin token" in err
    code, _, err = await _cli("http://127.0.0.1:9", "flags", "show")
    assert code == 1 and "unreachable" in err
    assert await _state(api) == before


async def test_the_rollout_owns_the_percentage_and_a_full_rollback_restores_the_roles(
    api: httpx.AsyncClient,
) -> None:
    reply = await api.patch("/admin/flags", json={"allowRoles": ["beta"]}, headers=ADMIN)
    assert reply.status_code == 200, reply.text
    start = await api.post("/admin/rollout/start", json={"plan": [10, 100]}, headers=ADMIN)
    assert start.status_code == 200, start.text
    flags = (await api.get("/admin/flags", headers=ADMIN)).json()
    assert flags["allowRoles"] == ["admin", "beta", "internal"]
    flags_before, _, audit_before = await _state(api)
    refused = await api.patch("/admin/flags", json={"percent": 60}, headers=ADMIN)
    assert (refused.status_code, refused.json()["code"]) == (409, "FORBIDDEN")
    flags_after, _, audit_after = await _state(api)
    assert (flags_after, audit_after) == (flags_before, audit_before)
    killed = await api.patch("/admin/flags", json={"enabled": False}, headers=ADMIN)
    assert killed.status_code == 200  # the kill switch always works
    back = await api.post("/admin/rollout/rollback", json={"reason": "drill"}, headers=ADMIN)
    assert back.status_code == 200, back.text
    flags = (await api.get("/admin/flags", headers=ADMIN)).json()
    assert (flags["percent"], flags["allowRoles"]) == (0, ["beta"])
    assert (await api.patch("/admin/flags", json={"percent": 5}, headers=ADMIN)).is_success
