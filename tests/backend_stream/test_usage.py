"""Usage per user and UTC day, and budgets checked before the model call (issue 12).

Real backend processes on the session's Redis; the scripted model reports deterministic usage
(prompt tokens = the prompt's words, completion tokens = the tokens it sent), and its call
counter (``backend_model_calls_total``) shows that a refused request never reached it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from backend_stream.usage import seconds_to_midnight
from tests.backend_stream.conftest import Backend, body, ids, metric, start_backend

PRICES = '{"scripted": {"input": 2.0, "output": 8.0}}'  # USD per million tokens
MAX_OUTPUT = 20
PROMPT_RESERVE = 30
RESERVATION = MAX_OUTPUT + PROMPT_RESERVE  # tokens one request reserves
BUDGET_TOKENS = 200


@pytest.fixture(scope="module")
def budgeted(redis_url: str) -> Iterator[Backend]:
    proc = start_backend(
        redis_url,
        MODEL_PRICES=PRICES,
        MAX_OUTPUT_TOKENS=str(MAX_OUTPUT),
        BUDGET_PROMPT_RESERVE_TOKENS=str(PROMPT_RESERVE),
        BUDGET_USER_DAILY_TOKENS=str(BUDGET_TOKENS),
        SCRIPTED_REPLY_TOKENS="12",
        BATCH_MAX_TOKENS=str(MAX_OUTPUT),
    )
    yield Backend(proc)
    proc.stop()


def _micro(prompt: int, completion: int) -> int:
    return math.ceil((prompt * 2.0 + completion * 8.0) / 1_000_000 * 1_000_000)


async def _complete(client: httpx.AsyncClient, payload: dict[str, str]) -> httpx.Response:
    return await client.post("/chat/messages", json=payload)


async def _usage(client: httpx.AsyncClient, user: str, **query: str) -> dict[str, Any]:
    reply = await client.get(f"/chat/usage/{user}", params=query)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


async def test_usage_is_the_sum_of_the_generations_usage_and_priced(budgeted: Backend) -> None:
    user = ids()["userId"]
    cost_before = metric(budgeted.url, "backend_cost_usd_total")
    prompt = completion = micro = 0
    async with budgeted.client() as client:
        for content in ("hello", "[[tokens=5]] a shorter one", "and a third [[tokens=9]]"):
            reply = await _complete(client, {**body(content), "userId": user})
            assert reply.status_code == 200, reply.text
            usage = reply.json()["usage"]
            prompt += usage["promptTokens"]
            completion += usage["completionTokens"]
            micro += _micro(usage["promptTokens"], usage["completionTokens"])
        got = await _usage(client, user)
    assert completion == 12 + 5 + 9 and prompt > 0
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    assert (got["userId"], got["day"]) == (user, today)
    assert (got["promptTokens"], got["completionTokens"]) == (prompt, completion)
    assert got["costUsd"] == pytest.approx(micro / 1_000_000)
    assert got["budget"] == {"tokens": BUDGET_TOKENS, "costUsd": None}
    assert got["remaining"]["tokens"] == BUDGET_TOKENS - prompt - completion  # none reserved now
    after = metric(budgeted.url, "backend_cost_usd_total")
    assert after - cost_before == pytest.approx(micro / 1_000_000, rel=1e-6)


async def test_twenty_concurrent_at_the_edge_overspend_by_at_most_one_reservation(
    budgeted: Backend,
) -> None:
    user = ids()["userId"]
    async with budgeted.client() as client:
        # walk the user to the edge in small steps (~10 tokens each): under the budget by
        # less than one burst request uses (its 20 output tokens alone)
        while True:
            spent = await _usage(client, user)
            used = spent["promptTokens"] + spent["completionTokens"]
            if used > BUDGET_TOKENS - 20:
                break
            reply = await _complete(client, {**body("[[tokens=1]] step"), "userId": user})
            assert reply.status_code == 200, reply.text
        assert used < BUDGET_TOKENS
        calls_before = budgeted.model_calls()
        burst = [{**body(f"burst {i} [[tokens=20]]"), "userId": user} for i in range(20)]
        replies = await asyncio.gather(*(_complete(client, p) for p in burst))
        admitted = [r for r in replies if r.status_code == 200]
        refused = [r for r in replies if r.status_code == 429]
        assert len(admitted) + len(refused) == 20, [r.status_code for r in replies]
        assert len(admitted) == 1  # the first one in; every other saw the reservation
        assert budgeted.model_calls() == calls_before + len(admitted)  # refused: no model call
        final = await _usage(client, user)
        total = final["promptTokens"] + final["completionTokens"]
        assert BUDGET_TOKENS <= total <= BUDGET_TOKENS + RESERVATION
        assert final["remaining"]["tokens"] == 0
        # the next one is refused before any model call, until the next UTC midnight
        calls = budgeted.model_calls()
        stream = await client.post("/chat/messages/stream", json={**body("x"), "userId": user})
        assert budgeted.model_calls() == calls
    for reply in (*refused, stream):
        assert reply.status_code == 429
        assert reply.json()["code"] == "BUDGET_EXCEEDED"
        retry_after = int(reply.headers["retry-after"])
        assert abs(retry_after - seconds_to_midnight()) <= 5
    print(f"budget edge: used {used} of {BUDGET_TOKENS}, 20 at once -> 1 admitted, total {total}")


async def _task_done(client: httpx.AsyncClient, task_id: str, user: str) -> dict[str, Any]:
    for _ in range(200):
        reply = await client.get(f"/chat/tasks/{task_id}", params={"userId": user})
        status: dict[str, Any] = reply.json()
        if status["status"] in ("done", "failed"):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} not done: {status}")


async def test_batch_tasks_are_budgeted_at_acceptance_and_counted(budgeted: Backend) -> None:
    user = ids()["userId"]
    async with budgeted.client() as client:
        task = {**body("[[tokens=10]] a background answer"), "userId": user}
        accepted = await client.post("/chat/tasks", json=task)
        assert accepted.status_code == 202, accepted.text
        done = await _task_done(client, task["requestId"], user)
        assert done["status"] == "done"
        got = await _usage(client, user)
        assert got["completionTokens"] == done["usage"]["completionTokens"] == 10
        assert got["promptTokens"] == done["usage"]["promptTokens"]
        # spend the rest; then a task is refused at acceptance, before anything is stored
        while (
            await _complete(client, {**body("[[tokens=20]] x"), "userId": user})
        ).status_code == 200:
            pass
        calls = budgeted.model_calls()
        later = {**body("later"), "userId": user}
        refused = await client.post("/chat/tasks", json=later)
        assert refused.status_code == 429, refused.text
        assert refused.json()["code"] == "BUDGET_EXCEEDED" and refused.headers["retry-after"]
        stored = await client.get(f"/chat/tasks/{later['requestId']}", params={"userId": user})
        assert stored.status_code == 404  # refused before anything was stored or queued
        assert budgeted.model_calls() == calls


async def test_a_replay_of_an_existing_request_is_served_over_budget(budgeted: Backend) -> None:
    user = ids()["userId"]
    async with budgeted.client() as client:
        first = {**body("[[tokens=20]] big"), "userId": user}
        while (await _complete(client, first)).status_code == 200:
            kept = first
            first = {**body("[[tokens=20]] big"), "userId": user}
        replay = await _complete(client, kept)  # the same requestId: the stored answer
        assert replay.status_code == 200, replay.text


async def test_a_spent_service_budget_refuses_everyone(redis_url: str) -> None:
    proc = start_backend(redis_url, BUDGET_SERVICE_DAILY_USD="0")
    try:
        backend = Backend(proc)
        calls = backend.model_calls()
        async with backend.client() as client:
            reply = await _complete(client, body("hello"))
        assert reply.status_code == 429, reply.text
        assert reply.json()["code"] == "BUDGET_EXCEEDED" and "service" in reply.json()["message"]
        assert backend.model_calls() == calls
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("prices", "expected"),
    [
        ("not json", "MODEL_PRICES must be a JSON object"),
        ('{"scripted": {"input": "2", "output": 8}}', "input must be a number"),
        ('{"scripted": {"input": 2}}', "must be {"),
        ('{"other-model": {"input": 1, "output": 1}}', "no price for the model in use"),
    ],
)
def test_a_malformed_price_table_is_a_clear_start_up_error(
    redis_url: str, prices: str, expected: str
) -> None:
    with pytest.raises(RuntimeError) as failed:
        start_backend(redis_url, MODEL_PRICES=prices, BUDGET_USER_DAILY_USD="1")
    assert expected in str(failed.value)


async def test_usage_route_bad_input(budgeted: Backend) -> None:
    async with budgeted.client() as client:
        assert (await client.get("/chat/usage/nobody-yet")).json()["promptTokens"] == 0
        for day in ("yesterday", "2026-13-45"):
            reply = await client.get("/chat/usage/u1", params={"day": day})
            assert reply.status_code == 422, reply.text
            assert reply.json()["code"] == "INVALID_PAYLOAD"
        old = await _usage(client, "u1", day="2020-01-01")
        assert old["day"] == "2020-01-01" and old["completionTokens"] == 0
    async with httpx.AsyncClient(base_url=budgeted.url, timeout=5) as anonymous:
        reply = await anonymous.get("/chat/usage/u1")  # the service token is required
    assert (reply.status_code, reply.json()["code"]) == (401, "UNAUTHORIZED")


async def test_a_prompt_beyond_its_reserve_is_refused_at_the_edge_before_the_model(
    budgeted: Backend,
) -> None:
    user = ids()["userId"]
    long_prompt = "word " * 39  # ~195 characters: ~65 tokens, more than the 30 reserved
    async with budgeted.client() as client:
        while True:
            spent = await _usage(client, user)
            if spent["promptTokens"] + spent["completionTokens"] >= BUDGET_TOKENS - RESERVATION:
                break
            assert (await _complete(client, {**body("[[tokens=1]] s"), "userId": user})).is_success
        calls = budgeted.model_calls()
        reply = await _complete(client, {**body(long_prompt), "userId": user})
        assert budgeted.model_calls() == calls, "the model was called over the budget"
        assert reply.status_code == 429 and reply.json()["code"] == "BUDGET_EXCEEDED", reply.text
        after = await _usage(client, user)
    assert after["remaining"]["tokens"] == BUDGET_TOKENS - (
        after["promptTokens"] + after["completionTokens"]
    )  # the refused request's reservation was given back


async def test_a_cancelled_generation_is_charged_what_it_used(budgeted: Backend) -> None:
    user = ids()["userId"]
    payload = {**body("[[tps=20]] [[tokens=20]] slowly"), "userId": user}
    async with budgeted.client() as client:
        async with client.stream("POST", "/chat/messages/stream", json=payload) as stream:
            seen = 0
            async for line in stream.aiter_lines():
                if line.startswith("event: chunk"):
                    seen += 1
                if seen >= 4:
                    cancel = await client.post(
                        f"/chat/messages/{payload['requestId']}/cancel",
                        params={"userId": user},
                    )
                    assert cancel.status_code == 200
                    break
        for _ in range(100):
            got = await _usage(client, user)
            if got["completionTokens"]:
                break
            await asyncio.sleep(0.05)
    assert got["completionTokens"] > 0 and got["promptTokens"] > 0  # an estimate, never free
    assert got["costUsd"] > 0


async def test_a_dead_process_reservation_is_given_back(redis_url: str) -> None:
    from redis.asyncio import Redis

    from backend_stream.metrics import Metrics
    from backend_stream.settings import BudgetSettings, Price
    from backend_stream.usage import SERVICE, UsageLedger, usage_key, utc_day

    redis = Redis.from_url(redis_url, decode_responses=True)
    budget = BudgetSettings(prices={"scripted": Price(1.0, 1.0)}, user_daily_tokens=1000)
    ledger = UsageLedger(redis, budget, Metrics(), reservation_ttl_s=1)
    dead, alive = ids()["userId"], ids()["userId"]
    day = utc_day()
    service_before = int(await redis.hget(usage_key(day, SERVICE), "res_micro") or 0)
    try:
        assert await ledger.reserve(dead, "r-dead", 100) is True  # its process dies: no settle
        assert int(await redis.hget(usage_key(day, dead), "res_tokens") or 0) > 0
        assert await ledger.reserve(dead, "r-dead", 100) is False  # a retry: reserved once
        await asyncio.sleep(2.2)
        assert await ledger.reserve(alive, "r-alive", 100) is True  # anyone's reserve cleans
        assert int(await redis.hget(usage_key(day, dead), "res_tokens")) == 0
        await ledger.settle(alive, "r-alive", None)
        assert await ledger.settle(alive, "r-alive", None) is False  # once
        service_after = int(await redis.hget(usage_key(day, SERVICE), "res_micro") or 0)
        assert service_after <= service_before  # nothing of the two left reserved
        # the dead one's late settle counts its usage but gives nothing back twice
        assert await ledger.settle(dead, "r-dead", None) is False  # its key expired with it
    finally:
        await redis.aclose()
