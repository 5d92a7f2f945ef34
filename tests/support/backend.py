"""The real backend as the e2e and integration suites run it: fast scripted model."""

from __future__ import annotations


def fast_backend_env(redis_url: str, token: str) -> dict[str, str]:
    """Environment of a ``backend_stream`` process with a quick, directive-aware scripted model."""
    return {
        "REDIS_URL": redis_url,
        "BACKEND_TOKEN": token,
        "PROVIDER": "scripted",
        "SCRIPTED_TTFT_MS": "30",
        "SCRIPTED_TOKENS_PER_S": "300",
        "SCRIPTED_REPLY_TOKENS": "25",
        "SCRIPTED_DIRECTIVES": "1",
    }
