"""``PROVIDER=openai``: any OpenAI-compatible chat.completions endpoint through the official SDK.

OpenAI, Gemini's OpenAI-compatible endpoint, vLLM and Ollama differ only in ``base_url``, key and
model. SDK exceptions are translated here, most specific first, into ``ProviderError``s; nothing
else of the SDK leaks out of this module.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

import openai
from openai import AsyncOpenAI

from backend_stream.errors import ModelFailed, ModelRateLimited, ModelTimeout, ProviderError
from backend_stream.providers.base import Delta, ModelRequest
from backend_stream.settings import OpenAISettings
from contracts import FinishReason, Usage

DEFAULT_CONNECT_TIMEOUT_S = 5.0
FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "content_filter": FinishReason.STOP,
    "tool_calls": FinishReason.STOP,
}


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds when it is a number (HTTP dates are ignored)."""
    raw = headers.get("retry-after")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 86_400 else None


def map_sdk_error(exc: Exception) -> ProviderError:
    """The ``ProviderError`` an SDK (or stream decoding) exception stands for."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, openai.APITimeoutError):
        return ModelTimeout("model request timed out")
    if isinstance(exc, openai.RateLimitError):
        return ModelRateLimited(
            "model rate limited", retry_after_s=retry_after_s(exc.response.headers)
        )
    if isinstance(exc, openai.APIStatusError):
        return ModelFailed(f"model answered HTTP {exc.status_code}")
    if isinstance(exc, openai.APIConnectionError):
        return ModelFailed("model endpoint unreachable")
    if isinstance(exc, openai.APIError):
        return ModelFailed("model reported an error in its stream")
    return ModelFailed(f"malformed model stream ({type(exc).__name__})")


class OpenAIProvider:
    """Streams ``chat.completions`` with ``stream=True`` and usage included in the stream."""

    name = "openai"

    def __init__(
        self,
        settings: OpenAISettings,
        *,
        first_token_timeout_s: float,
        idle_timeout_s: float,
        total_timeout_s: float,
    ) -> None:
        self._model = settings.model
        timeout = openai.Timeout(
            total_timeout_s,
            connect=min(DEFAULT_CONNECT_TIMEOUT_S, first_token_timeout_s),
            read=max(first_token_timeout_s, idle_timeout_s),
        )
        self._client = AsyncOpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key or "unset",
            max_retries=settings.max_retries,
            timeout=timeout,
        )

    async def open_stream(self, request: ModelRequest) -> AsyncGenerator[Delta, None]:
        messages: list[Any] = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            stream = await self._client.chat.completions.create(
                model=self._model,
                messages=messages,
                max_tokens=request.max_output_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
        except Exception as exc:  # the SDK's tree, mapped in one place
            raise map_sdk_error(exc) from exc
        return self._iterate(stream)

    async def aclose(self) -> None:
        await self._client.close()

    async def _iterate(self, stream: Any) -> AsyncGenerator[Delta, None]:
        try:
            async for chunk in stream:
                delta = _to_delta(chunk)
                if delta is not None:
                    yield delta
        except Exception as exc:
            raise map_sdk_error(exc) from exc
        finally:
            await stream.close()


def _to_delta(chunk: Any) -> Delta | None:
    usage = None
    if getattr(chunk, "usage", None) is not None:
        u = chunk.usage
        usage = Usage(
            prompt_tokens=int(u.prompt_tokens or 0),
            completion_tokens=int(u.completion_tokens or 0),
            total_tokens=int(u.total_tokens or 0),
        )
    choices = chunk.choices
    if not isinstance(choices, list):
        raise ModelFailed("malformed model stream (no choices)")
    text, finish = "", None
    if choices:
        choice = choices[0]
        content = getattr(choice.delta, "content", None) if choice.delta is not None else None
        if content is not None and not isinstance(content, str):
            raise ModelFailed("malformed model stream (content)")
        text = content or ""
        if choice.finish_reason:
            finish = FINISH_REASONS.get(str(choice.finish_reason), FinishReason.STOP)
    if not text and usage is None and finish is None:
        return None
    return Delta(text=text, usage=usage, finish_reason=finish)
