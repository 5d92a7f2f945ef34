"""Model providers behind one streaming interface (``Provider``)."""

from __future__ import annotations

from backend_stream.providers.base import Delta, ModelRequest, PromptMessage, Provider
from backend_stream.providers.openai_compat import OpenAIProvider
from backend_stream.providers.scripted import ScriptedProvider
from backend_stream.settings import ProviderName, Settings

__all__ = [
    "Delta",
    "ModelRequest",
    "OpenAIProvider",
    "PromptMessage",
    "Provider",
    "ScriptedProvider",
    "make_provider",
]


def make_provider(settings: Settings) -> Provider:
    """The provider ``PROVIDER`` names."""
    if settings.provider is ProviderName.OPENAI:
        return OpenAIProvider(
            settings.openai,
            first_token_timeout_s=settings.first_token_timeout_s,
            idle_timeout_s=settings.idle_timeout_s,
            total_timeout_s=settings.total_timeout_s,
        )
    return ScriptedProvider(settings.scripted)
