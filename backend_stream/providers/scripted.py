"""A deterministic fake model for demos, tests and load tests: no network, configurable pace.

The reply depends only on the prompt's last user message (same input, same reply); it is Korean
when that message contains Hangul, else English. With ``SCRIPTED_DIRECTIVES=1`` the message may
carry fault-injection directives for the load tester, e.g. ``[[ttft_ms=2000]]``, ``[[tps=5]]``,
``[[tokens=80]]``, ``[[fail=429]]`` / ``[[fail=500]]`` / ``[[fail=hang]]`` (at open),
``[[fail_after=5]]`` (model error after 5 tokens), ``[[stall_after=5]]`` (no token after 5),
``[[recall=1]]`` (the reply reports what the prompt held: ``seen <n> <digest>``, n the assistant
messages in it and digest the first 12 hex digits of sha256 over their contents joined by a
newline; the room-order tests check with it that each prompt saw every earlier answer whole).
They are ignored when the switch is off, so a user cannot slow a deployed service down.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace

from backend_stream.errors import ModelFailed, ModelRateLimited
from backend_stream.providers.base import Delta, ModelRequest
from backend_stream.settings import ScriptedSettings
from contracts import FinishReason, Usage

HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
DIRECTIVE = re.compile(r"\[\[(\w+)=([\w.]+)\]\]")
HANG_S = 3600.0
RATE_LIMIT_RETRY_AFTER_S = 1.0

ENGLISH_WORDS = (
    "sure", "that", "sounds", "great", "I", "think", "we", "could", "try", "it", "together",
    "today", "tell", "me", "more", "about", "your", "day", "the", "weather", "is", "lovely",
    "and", "a", "walk", "might", "help", "what", "do", "you", "feel", "like", "doing", "next",
)  # fmt: skip
KOREAN_WORDS = (
    "좋아요", "그렇군요", "오늘", "날씨가", "정말", "좋네요", "같이", "해볼까요", "이야기를",
    "더", "들려주세요", "저는", "생각해요", "산책", "어때요", "기분이", "어떠세요", "다음에",
    "무엇을", "하고", "싶으세요", "재미있겠네요", "천천히", "함께",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Plan:
    ttft_ms: float
    tokens_per_s: float
    reply_tokens: int
    fail: str | None = None
    fail_after: int | None = None
    stall_after: int | None = None
    recall: bool = False


def reply_tokens_for(content: str, count: int) -> list[str]:
    """The deterministic reply to ``content``: ``count`` tokens, each a word with its spacing."""
    seed = int.from_bytes(hashlib.sha256(content.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    words = KOREAN_WORDS if HANGUL.search(content) else ENGLISH_WORDS
    return [(" " if i else "") + rng.choice(words) for i in range(count)]


def recall(request: ModelRequest) -> list[str]:
    """``[[recall=1]]``: the reply names the assistant messages the prompt held."""
    answers = [m.content for m in request.messages if m.role == "assistant"]
    digest = hashlib.sha256("\n".join(answers).encode()).hexdigest()[:12]
    return ["seen", f" {len(answers)}", f" {digest}"]


class ScriptedProvider:
    """``PROVIDER=scripted``: sleeps ``ttft_ms``, then emits words at ``tokens_per_s``."""

    name = "scripted"

    def __init__(self, settings: ScriptedSettings) -> None:
        self._settings = settings

    async def open_stream(self, request: ModelRequest) -> AsyncGenerator[Delta, None]:
        user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        plan = self._plan(user)
        if plan.fail == "429":
            raise ModelRateLimited("scripted rate limit", retry_after_s=RATE_LIMIT_RETRY_AFTER_S)
        if plan.fail == "500":
            raise ModelFailed("scripted model error")
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        tokens = recall(request) if plan.recall else reply_tokens_for(user, plan.reply_tokens)
        return self._emit(plan, tokens, request, prompt_tokens)

    async def aclose(self) -> None:
        return None

    def _plan(self, user: str) -> _Plan:
        s = self._settings
        plan = _Plan(ttft_ms=s.ttft_ms, tokens_per_s=s.tokens_per_s, reply_tokens=s.reply_tokens)
        if not s.directives:
            return plan
        for key, value in DIRECTIVE.findall(user):
            plan = _apply_directive(plan, key, value)
        return plan

    async def _emit(
        self, plan: _Plan, tokens: list[str], request: ModelRequest, prompt_tokens: int
    ) -> AsyncGenerator[Delta, None]:
        if plan.fail == "hang":
            await asyncio.sleep(HANG_S)
        budget = request.max_output_tokens
        start = time.monotonic() + plan.ttft_ms / 1000
        interval = 1 / plan.tokens_per_s if plan.tokens_per_s > 0 else 0.0
        emitted = 0
        for i, token in enumerate(tokens[:budget]):
            if plan.stall_after is not None and i >= plan.stall_after:
                await asyncio.sleep(HANG_S)
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if plan.fail_after is not None and i >= plan.fail_after:
                raise ModelFailed("scripted model failure mid-stream")
            emitted += 1
            yield Delta(text=token)
        finish = FinishReason.LENGTH if len(tokens) > budget else FinishReason.STOP
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=emitted,
            total_tokens=prompt_tokens + emitted,
        )
        yield Delta(usage=usage, finish_reason=finish)


def _apply_directive(plan: _Plan, key: str, value: str) -> _Plan:
    try:
        if key == "ttft_ms":
            return replace(plan, ttft_ms=max(0.0, float(value)))
        if key == "tps":
            return replace(plan, tokens_per_s=max(0.0, float(value)))
        if key == "tokens":
            return replace(plan, reply_tokens=max(0, min(int(value), 100_000)))
        if key == "fail":
            return replace(plan, fail=value)
        if key == "fail_after":
            return replace(plan, fail_after=max(0, int(value)))
        if key == "stall_after":
            return replace(plan, stall_after=max(0, int(value)))
        if key == "recall":
            return replace(plan, recall=value == "1")
    except ValueError:
        return plan
    return plan
