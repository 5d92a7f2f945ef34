"""The scripted model: deterministic, bilingual, fault directives only when switched on."""

from __future__ import annotations

import time

import pytest

from backend_stream.errors import ModelRateLimited
from backend_stream.providers import Delta, ModelRequest, PromptMessage, ScriptedProvider
from backend_stream.providers.scripted import reply_tokens_for
from backend_stream.settings import ScriptedSettings


def request(content: str, max_tokens: int = 100) -> ModelRequest:
    return ModelRequest(
        messages=(PromptMessage("system", "s"), PromptMessage("user", content)),
        max_output_tokens=max_tokens,
    )


async def run(provider: ScriptedProvider, content: str, max_tokens: int = 100) -> list[Delta]:
    return [d async for d in await provider.open_stream(request(content, max_tokens))]


def test_same_input_gives_the_same_reply_and_hangul_gives_korean() -> None:
    assert reply_tokens_for("hello", 20) == reply_tokens_for("hello", 20)
    assert reply_tokens_for("hello", 20) != reply_tokens_for("hello!", 20)
    korean = "".join(reply_tokens_for("안녕", 10))
    assert all("\uac00" <= ch <= "\ud7a3" or ch == " " for ch in korean)
    assert "".join(reply_tokens_for("hi", 10)).replace(" ", "").isascii()


async def test_ttft_and_pace_follow_the_settings() -> None:
    provider = ScriptedProvider(ScriptedSettings(ttft_ms=150, tokens_per_s=100, reply_tokens=6))
    began = time.monotonic()
    stream = await provider.open_stream(request("hi"))
    first = await anext(stream)
    ttft = time.monotonic() - began
    rest = [d async for d in stream]
    assert first.text and 0.14 <= ttft < 1.0
    assert len([d for d in rest if d.text]) == 5
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == 6


async def test_output_budget_cuts_the_reply_with_finish_reason_length() -> None:
    provider = ScriptedProvider(ScriptedSettings(ttft_ms=0, tokens_per_s=0, reply_tokens=30))
    deltas = await run(provider, "hi", max_tokens=4)
    assert len([d for d in deltas if d.text]) == 4
    assert deltas[-1].finish_reason == "length"


async def test_directives_are_ignored_unless_switched_on() -> None:
    quiet = ScriptedProvider(ScriptedSettings(ttft_ms=0, tokens_per_s=0, reply_tokens=3))
    assert len([d for d in await run(quiet, "x [[fail=429]] [[tokens=9]]") if d.text]) == 3
    loud = ScriptedProvider(
        ScriptedSettings(ttft_ms=0, tokens_per_s=0, reply_tokens=3, directives=True)
    )
    assert len([d for d in await run(loud, "x [[tokens=9]] [[tps=bad]]") if d.text]) == 9
    with pytest.raises(ModelRateLimited):
        await loud.open_stream(request("x [[fail=429]]"))
