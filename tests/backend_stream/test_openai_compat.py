"""The openai provider against a local server speaking the real streaming wire, via the SDK."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from backend_stream.errors import ModelFailed, ModelRateLimited, ModelTimeout, ProviderError
from backend_stream.providers import Delta, ModelRequest, OpenAIProvider, PromptMessage
from backend_stream.settings import OpenAISettings
from contracts import FinishReason, Usage
from tests.backend_stream.conftest import Backend, body, start_backend
from tests.backend_stream.fake_openai import TOKENS, FakeOpenAI


def provider_for(fake: FakeOpenAI, timeout_s: float = 5.0) -> OpenAIProvider:
    settings = OpenAISettings(base_url=fake.base_url, api_key="sk-test", model="fake-model")
    return OpenAIProvider(
        settings, first_token_timeout_s=timeout_s, idle_timeout_s=timeout_s, total_timeout_s=30
    )


def request(content: str) -> ModelRequest:
    messages = (PromptMessage("system", "be nice"), PromptMessage("user", content))
    return ModelRequest(messages=messages, max_output_tokens=64)


async def collect(provider: OpenAIProvider, content: str) -> list[Delta]:
    stream = await provider.open_stream(request(content))
    return [d async for d in stream]


async def test_streams_tokens_usage_and_finish_reason_through_the_sdk() -> None:
    async with FakeOpenAI() as fake:
        provider = provider_for(fake)
        deltas = await collect(provider, "ok")
        await provider.aclose()
    assert "".join(d.text for d in deltas) == "".join(TOKENS)
    assert [d.finish_reason for d in deltas if d.finish_reason] == [FinishReason.STOP]
    assert [d.usage for d in deltas if d.usage] == [
        Usage(prompt_tokens=11, completion_tokens=6, total_tokens=17)
    ]
    sent = fake.requests[0]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 64
    assert sent["model"] == "fake-model"
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]


@pytest.mark.parametrize(
    ("mode", "error", "code"),
    [
        ("429", ModelRateLimited, "RATE_LIMITED"),
        ("500", ModelFailed, "MODEL_ERROR"),
        ("malformed", ModelFailed, "MODEL_ERROR"),
        ("slow", ModelTimeout, "MODEL_TIMEOUT"),
    ],
)
async def test_sdk_errors_map_to_contract_codes(
    mode: str, error: type[ProviderError], code: str
) -> None:
    async with FakeOpenAI() as fake:
        provider = provider_for(fake, timeout_s=0.5)
        with pytest.raises(error) as caught:
            await collect(provider, mode)
        await provider.aclose()
    assert caught.value.code == code
    if mode == "429":
        assert isinstance(caught.value, ModelRateLimited)
        assert caught.value.retry_after_s == 7


async def test_backend_with_openai_provider_streams_and_maps_errors(redis_url: str) -> None:
    async with FakeOpenAI() as fake:
        proc = start_backend(
            redis_url,
            PROVIDER="openai",
            OPENAI_BASE_URL=fake.base_url,
            OPENAI_API_KEY="sk-test",
            OPENAI_MODEL="fake-model",
            MODEL_IDLE_TIMEOUT_S="0.5",
        )
        try:
            async with Backend(proc).client() as client:
                ok = await client.post("/chat/messages/stream", json=body("ok"))
                limited = await client.post("/chat/messages/stream", json=body("429"))
                failed = await client.post("/chat/messages", json=body("500"))
                malformed = await client.post("/chat/messages/stream", json=body("malformed"))
                stalled = await client.post("/chat/messages/stream", json=body("stall"))
        finally:
            proc.stop()
    assert ok.status_code == 200
    end = json.loads(ok.text.rstrip().rsplit("data: ", 1)[1])
    assert end["content"] == "".join(TOKENS)
    assert end["usage"] == {"promptTokens": 11, "completionTokens": 6, "totalTokens": 17}
    assert (limited.status_code, limited.json()["code"]) == (429, "RATE_LIMITED")
    assert limited.headers["retry-after"] == "7"
    assert (failed.status_code, failed.json()["code"]) == (502, "MODEL_ERROR")
    assert "event: error" in malformed.text and '"code":"MODEL_ERROR"' in malformed.text
    assert "event: error" in stalled.text and '"code":"STREAM_TIMEOUT"' in stalled.text


async def test_prompt_is_character_prompt_then_room_history_then_user_message(
    redis_url: str,
) -> None:
    room = body()["roomId"]
    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.hset("bs:character:mina-1", "systemPrompt", "You are Mina.")
    await redis.aclose()
    async with FakeOpenAI() as fake:
        proc = start_backend(
            redis_url, PROVIDER="openai", OPENAI_BASE_URL=fake.base_url, HISTORY_MESSAGES="2"
        )
        try:
            async with Backend(proc).client() as client:
                for text in ("ok", "ok", "ok"):
                    payload = {**body(text, characterId="mina-1"), "roomId": room}
                    assert (await client.post("/chat/messages", json=payload)).status_code == 200
        finally:
            proc.stop()
    last = fake.requests[-1]["messages"]
    assert last[0] == {"role": "system", "content": "You are Mina."}
    assert [m["role"] for m in last[1:]] == ["user", "assistant", "user"]
    assert last[2]["content"] == "".join(TOKENS)
