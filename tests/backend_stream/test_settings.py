"""Settings from the environment: defaults, parsing, refusals."""

from __future__ import annotations

import pytest

from backend_stream.settings import (
    DEFAULT_FLUSH_WINDOW_MS,
    DEFAULT_HISTORY_MESSAGES,
    DEV_BACKEND_TOKEN,
    ProviderName,
    Settings,
    SettingsError,
)
from contracts import DEFAULT_MAX_CONTENT_CHARS


def test_without_a_service_token_the_backend_refuses_to_start() -> None:
    """Issue 7: a backend deployed without BACKEND_TOKEN accepted the well-known dev token."""
    for env in ({}, {"BACKEND_TOKEN": DEV_BACKEND_TOKEN}, {"BACKEND_INSECURE_DEV_TOKEN": "0"}):
        with pytest.raises(SettingsError, match="BACKEND_TOKEN"):
            Settings.from_env(env)


def test_empty_environment_in_insecure_dev_mode_gives_the_embedded_dev_defaults() -> None:
    settings = Settings.from_env({"BACKEND_INSECURE_DEV_TOKEN": "1"})
    assert settings.redis_url is None
    assert settings.backend_token == DEV_BACKEND_TOKEN and settings.token_is_default
    assert settings.provider is ProviderName.SCRIPTED
    assert settings.history_messages == DEFAULT_HISTORY_MESSAGES == 10
    assert settings.flush_window_ms == DEFAULT_FLUSH_WINDOW_MS == 30
    assert settings.max_content_chars == DEFAULT_MAX_CONTENT_CHARS
    assert settings.scripted.directives is False
    assert settings.max_body_bytes >= settings.max_content_chars * 12


def test_environment_values_are_parsed_into_typed_settings() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://example:6379/1",
            "BACKEND_TOKEN": "tok",
            "PROVIDER": "OpenAI",
            "OPENAI_BASE_URL": "http://vllm:8000/v1",
            "OPENAI_MODEL": "qwen",
            "SCRIPTED_TTFT_MS": "12.5",
            "SCRIPTED_DIRECTIVES": "yes",
            "MAX_CONTENT_CHARS": "10000",
            "SSE_PING_INTERVAL_S": "0.5",
        }
    )
    assert settings.redis_url == "redis://example:6379/1"
    assert settings.backend_token == "tok" and not settings.token_is_default
    assert settings.provider is ProviderName.OPENAI
    assert settings.openai.base_url == "http://vllm:8000/v1"
    assert settings.openai.model == "qwen"
    assert settings.scripted.ttft_ms == 12.5
    assert settings.scripted.directives is True
    assert settings.max_body_bytes >= 120_000
    assert settings.ping_interval_s == 0.5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PROVIDER", "llama"),
        ("HISTORY_MESSAGES", "ten"),
        ("HISTORY_MESSAGES", "-1"),
        ("FLUSH_WINDOW_MS", "nan"),
        ("SCRIPTED_DIRECTIVES", "maybe"),
        ("MODEL_TOTAL_TIMEOUT_S", "0"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({"BACKEND_TOKEN": "tok", name: value})


def test_task_settings_have_defaults_bounds_and_a_webhook_needs_its_secret() -> None:
    base = {"BACKEND_TOKEN": "tok"}
    tasks = Settings.from_env(base).tasks
    assert (tasks.workers, tasks.claim_idle_s, tasks.max_attempts) == (4, 30.0, 3)
    assert (tasks.timeout_s, tasks.ttl_s, tasks.batch_max_tokens) == (600.0, 7 * 86_400, 4096)
    assert tasks.webhook_url is None and tasks.webhook_max_attempts == 5
    hook = {"TASK_WEBHOOK_URL": "https://apps.example/hook", "TASK_WEBHOOK_SECRET": "s" * 16}
    configured = Settings.from_env({**base, **hook, "TASK_WORKERS": "0"}).tasks
    assert configured.webhook_url == "https://apps.example/hook"
    assert configured.webhook_secret == "s" * 16 and configured.workers == 0
    refused = {
        "TASK_WORKERS": "257",
        "TASK_CLAIM_IDLE_S": "0.1",
        "TASK_MAX_ATTEMPTS": "0",
        "TASK_TIMEOUT_S": "soon",
        "TASK_TTL_S": "59",
        "BATCH_MAX_TOKENS": "0",
        "TASK_WEBHOOK_MAX_ATTEMPTS": "21",
        "TASK_WEBHOOK_TIMEOUT_S": "nan",
    }
    for name, value in refused.items():
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({**base, name: value})
    with pytest.raises(SettingsError, match="TASK_WEBHOOK_SECRET"):
        Settings.from_env({**base, "TASK_WEBHOOK_URL": "https://apps.example/hook"})
    with pytest.raises(SettingsError, match="TASK_WEBHOOK_SECRET"):
        Settings.from_env({**base, **hook, "TASK_WEBHOOK_SECRET": "short"})
    with pytest.raises(SettingsError, match="TASK_WEBHOOK_URL"):
        Settings.from_env({**base, **hook, "TASK_WEBHOOK_URL": "ftp://apps.example/hook"})
