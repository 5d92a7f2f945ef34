"""Budgets through the bridge (issue 12): a spent user's send is rejected with BUDGET_EXCEEDED
and ``retryAfterMs`` to the next UTC midnight, before any model call; ``GET /me/usage`` is the
caller's own usage. A real backend process with a small budget, a real bridge process, Redis.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from backend_stream.usage import seconds_to_midnight
from tests.bridge.harness import connected, new_id, token
from tests.integration.conftest import BACKEND_TOKEN, bridge_env
from tests.support.backend import fast_backend_env
from tests.support.procs import ServerProcess

BUDGET = 120


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[tuple[str, str]]:
    env = {
        **fast_backend_env(redis_url, BACKEND_TOKEN),
        "BUDGET_USER_DAILY_TOKENS": str(BUDGET),
        "MAX_OUTPUT_TOKENS": "30",
        "BUDGET_PROMPT_RESERVE_TOKENS": "30",
    }
    with ServerProcess.python_module("backend_stream", env=env) as backend:
        with ServerProcess.python_module("bridge", env=bridge_env(redis_url, backend)) as bridge:
            yield bridge.url, backend.url


def _model_calls(backend_url: str) -> float:
    text = httpx.get(f"{backend_url}/metrics", timeout=5).text
    match = re.search(r'^backend_model_calls_total\{provider="scripted"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_a_spent_user_is_refused_with_retry_after_and_sees_its_usage(
    stack: tuple[str, str],
) -> None:
    bridge_url, backend_url = stack
    user, room = new_id("budget-user"), new_id("budget-room")
    spent = 0
    async with connected(bridge_url, user) as client:
        assert (await client.call("join_room", {"roomId": room}))["ok"] is True
        rejected = None
        for i in range(20):
            ack = await client.call(
                "send_message", {"roomId": room, "content": f"[[tokens=20]] spend {i}"}
            )
            if not ack["ok"]:
                rejected = ack
                break
            await client.wait_for("message_ack", count=i + 1)
            end = [e for e in client.named("ai_message_end") if e["requestId"] == ack["requestId"]]
            usage = end[0]["usage"]
            spent += usage["promptTokens"] + usage["completionTokens"]
        assert rejected is not None, "the budget never ran out"
        calls = _model_calls(backend_url)
        again = await client.call("send_message", {"roomId": room, "content": "one more"})
        assert _model_calls(backend_url) == calls  # refused before the model
    # refused once the day's usage, or the prompt the room's history makes, leaves no room
    assert spent > 0
    for ack in (rejected, again):
        assert (ack["ok"], ack["stage"], ack["code"]) == (False, "rejected", "BUDGET_EXCEEDED")
        assert abs(ack["retryAfterMs"] / 1000 - seconds_to_midnight()) <= 5
    async with httpx.AsyncClient(base_url=bridge_url, timeout=10) as http:
        mine = await http.get("/me/usage", headers={"Authorization": f"Bearer {token(user)}"})
        assert mine.status_code == 200, mine.text
        body = mine.json()
        assert body["userId"] == user
        assert body["promptTokens"] + body["completionTokens"] == spent
        assert body["budget"]["tokens"] == BUDGET
        assert body["remaining"]["tokens"] == max(0, BUDGET - spent)  # nothing left reserved
        other = await http.get("/me/usage", headers={"Authorization": f"Bearer {token('x-1')}"})
        assert other.json()["userId"] == "x-1" and other.json()["completionTokens"] == 0
        assert (await http.get("/me/usage")).status_code == 401
        assert (await http.post("/me/usage")).status_code == 405
