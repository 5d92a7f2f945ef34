"""Settings of the backend service, read once from the environment by ``__main__``.

Every knob has a ``DEFAULT_*`` constant and an environment variable; backend_stream/README.md has
the table. Durations carry their unit in the name (``_ms`` / ``_s``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from urllib.parse import urlsplit

from contracts import DEFAULT_MAX_CONTENT_CHARS
from contracts.tracing import service_name, traces_enabled

DEV_BACKEND_TOKEN = "dev-backend-token"

DEFAULT_PROVIDER = "scripted"
DEFAULT_SCRIPTED_TTFT_MS = 300.0
DEFAULT_SCRIPTED_TOKENS_PER_S = 30.0
DEFAULT_SCRIPTED_REPLY_TOKENS = 40
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
DEFAULT_OPENAI_MAX_RETRIES = 0
DEFAULT_MAX_OUTPUT_TOKENS = 512
DEFAULT_HISTORY_MESSAGES = 10
DEFAULT_HISTORY_CAP = 200
DEFAULT_HISTORY_TTL_S = 30 * 86_400  # an idle room's history expires after 30 days
DEFAULT_FLUSH_WINDOW_MS = 30.0
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 30.0
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_TOTAL_TIMEOUT_S = 300.0
DEFAULT_BUFFER_TTL_S = 900
DEFAULT_IDEMPOTENCY_TTL_S = 86_400
DEFAULT_PING_INTERVAL_S = 15.0
DEFAULT_LEASE_S = 10.0
DEFAULT_ROOM_QUEUE_MAX = 5
DEFAULT_ROOM_LOCK_TTL_S = 10.0
DEFAULT_ROOM_QUEUE_WAIT_S = 120.0
DEFAULT_ROOM_BUSY_RETRY_S = 2.0
DEFAULT_REDIS_MAX_CONNECTIONS = 2000
DEFAULT_REDIS_TIMEOUT_S = 5.0
DEFAULT_SYSTEM_PROMPT = "You are a friendly chat character. Answer briefly."
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_SERVICE_NAME = "chat-backend"
# JSON may spell one character as a 12-byte surrogate pair escape; leave room for the envelope.
BODY_BYTES_PER_CHAR = 12
BODY_OVERHEAD_BYTES = 4096
MIN_MAX_BODY_BYTES = 65_536


DEFAULT_BUDGET_PROMPT_RESERVE_TOKENS = 2000
ANY_MODEL = "*"
# USD per million tokens. The scripted model is priced like the default OpenAI model so that the
# cost path runs (and is tested) without a hosted model.
DEFAULT_MODEL_PRICES = (
    '{"gpt-4o-mini": {"input": 0.15, "output": 0.6}, "scripted": {"input": 0.15, "output": 0.6}}'
)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float


@dataclass(frozen=True)
class BudgetSettings:
    """Per-user and service daily budgets (backend_stream/usage.py); ``None``: no limit."""

    prices: Mapping[str, Price]
    model: str = DEFAULT_PROVIDER  # the model in use, the key into ``prices``
    user_daily_tokens: int | None = None
    user_daily_usd: float | None = None
    service_daily_usd: float | None = None
    # reserved for the prompt of each request, beside its output budget (settled to the real
    # usage when it ends): a burst overspends by at most one request's reservation as long as
    # prompts stay under it
    prompt_reserve_tokens: int = DEFAULT_BUDGET_PROMPT_RESERVE_TOKENS

    @property
    def price(self) -> Price:
        """The model's price; ``"*"`` in the table prices every model it does not name."""
        return self.prices.get(self.model) or self.prices.get(ANY_MODEL) or Price(0.0, 0.0)

    @property
    def limited(self) -> bool:
        return any(
            v is not None
            for v in (self.user_daily_tokens, self.user_daily_usd, self.service_daily_usd)
        )


def parse_prices(raw: str) -> dict[str, Price]:
    """``MODEL_PRICES``: ``{"model": {"input": usd_per_million, "output": usd_per_million}}``
    (``"*"``: every other model)."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise SettingsError("MODEL_PRICES must be a JSON object") from None
    if not isinstance(data, dict) or not data:
        raise SettingsError('MODEL_PRICES must be a non-empty object: {"model": {...}}')
    prices: dict[str, Price] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"input", "output"}:
            raise SettingsError(f'MODEL_PRICES[{model!r}] must be {{"input": n, "output": n}}')
        values = []
        for kind in ("input", "output"):
            value = entry[kind]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SettingsError(f"MODEL_PRICES[{model!r}].{kind} must be a number")
            if not 0 <= value < 1e6 or value != value:
                raise SettingsError(f"MODEL_PRICES[{model!r}].{kind} must be in 0..1e6")
            values.append(float(value))
        prices[str(model)] = Price(*values)
    return prices


class ProviderName(StrEnum):
    SCRIPTED = "scripted"
    OPENAI = "openai"


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot run with."""


@dataclass(frozen=True, kw_only=True)
class ScriptedSettings:
    ttft_ms: float = DEFAULT_SCRIPTED_TTFT_MS
    tokens_per_s: float = DEFAULT_SCRIPTED_TOKENS_PER_S
    reply_tokens: int = DEFAULT_SCRIPTED_REPLY_TOKENS
    # Fault-injection directives in the user message ([[fail:429]] ...); off unless asked for.
    directives: bool = False


@dataclass(frozen=True, kw_only=True)
class OpenAISettings:
    base_url: str = DEFAULT_OPENAI_BASE_URL
    api_key: str = ""
    model: str = DEFAULT_OPENAI_MODEL
    max_retries: int = DEFAULT_OPENAI_MAX_RETRIES


DEFAULT_TASK_WORKERS = 4
DEFAULT_TASK_CLAIM_IDLE_S = 30.0
DEFAULT_TASK_MAX_ATTEMPTS = 3
DEFAULT_TASK_TIMEOUT_S = 600.0
DEFAULT_TASK_TTL_S = 7 * 86_400
DEFAULT_TASK_QUEUE_MAX = 10_000
DEFAULT_BATCH_MAX_TOKENS = 4096
DEFAULT_TASK_WEBHOOK_MAX_ATTEMPTS = 5
DEFAULT_TASK_WEBHOOK_TIMEOUT_S = 10.0
MIN_WEBHOOK_SECRET_CHARS = 16


@dataclass(frozen=True, kw_only=True)
class TaskSettings:
    """Batch tasks (backend_stream/tasks.py, README "Batch tasks")."""

    workers: int = DEFAULT_TASK_WORKERS  # concurrent jobs per replica (0: this one runs none)
    claim_idle_s: float = DEFAULT_TASK_CLAIM_IDLE_S  # a job idle this long is taken over
    max_attempts: int = DEFAULT_TASK_MAX_ATTEMPTS
    timeout_s: float = DEFAULT_TASK_TIMEOUT_S  # whole job, from its first start
    ttl_s: int = DEFAULT_TASK_TTL_S  # life of a task record (its outcome stays readable)
    queue_max: int = DEFAULT_TASK_QUEUE_MAX  # entries the queue may hold; more: 503
    batch_max_tokens: int = DEFAULT_BATCH_MAX_TOKENS  # max_tokens of a batch generation
    webhook_url: str | None = None
    webhook_secret: str = ""
    webhook_max_attempts: int = DEFAULT_TASK_WEBHOOK_MAX_ATTEMPTS
    webhook_timeout_s: float = DEFAULT_TASK_WEBHOOK_TIMEOUT_S


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service reads from its environment."""

    redis_url: str | None = None
    backend_token: str = DEV_BACKEND_TOKEN
    token_is_default: bool = True
    provider: ProviderName = ProviderName.SCRIPTED
    scripted: ScriptedSettings = ScriptedSettings()
    openai: OpenAISettings = OpenAISettings()
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    budget: BudgetSettings = field(
        default_factory=lambda: BudgetSettings(prices=parse_prices(DEFAULT_MODEL_PRICES))
    )
    tasks: TaskSettings = TaskSettings()
    history_messages: int = DEFAULT_HISTORY_MESSAGES
    history_cap: int = DEFAULT_HISTORY_CAP
    history_ttl_s: int = DEFAULT_HISTORY_TTL_S
    flush_window_ms: float = DEFAULT_FLUSH_WINDOW_MS
    max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS
    max_body_bytes: int = MIN_MAX_BODY_BYTES
    first_token_timeout_s: float = DEFAULT_FIRST_TOKEN_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    total_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S
    buffer_ttl_s: int = DEFAULT_BUFFER_TTL_S
    idempotency_ttl_s: int = DEFAULT_IDEMPOTENCY_TTL_S
    ping_interval_s: float = DEFAULT_PING_INTERVAL_S
    lease_s: float = DEFAULT_LEASE_S
    # The per-room lock: one generation at a time per room, in acceptance order (issue 11)
    room_queue_max: int = DEFAULT_ROOM_QUEUE_MAX
    room_lock_ttl_s: float = DEFAULT_ROOM_LOCK_TTL_S
    room_queue_wait_s: float = DEFAULT_ROOM_QUEUE_WAIT_S
    room_busy_retry_s: float = DEFAULT_ROOM_BUSY_RETRY_S
    redis_max_connections: int = DEFAULT_REDIS_MAX_CONNECTIONS
    redis_timeout_s: float = DEFAULT_REDIS_TIMEOUT_S
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    log_level: str = DEFAULT_LOG_LEVEL
    # OpenTelemetry traces (contracts/tracing.py: off unless an OTLP endpoint is configured)
    tracing: bool = False
    service_name: str = DEFAULT_SERVICE_NAME

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; raise ``SettingsError`` on bad values."""
        env = _Env(environ)
        token = (environ.get("BACKEND_TOKEN") or "").strip()
        insecure = env.flag("BACKEND_INSECURE_DEV_TOKEN", False)
        if token in ("", DEV_BACKEND_TOKEN) and not insecure:
            raise SettingsError(
                "set BACKEND_TOKEN to the service token the bridge sends (the development "
                "default is refused unless BACKEND_INSECURE_DEV_TOKEN=1)"
            )
        max_chars = env.integer("MAX_CONTENT_CHARS", DEFAULT_MAX_CONTENT_CHARS)
        default_body = max(
            MIN_MAX_BODY_BYTES, max_chars * BODY_BYTES_PER_CHAR + BODY_OVERHEAD_BYTES
        )
        return cls(
            redis_url=environ.get("REDIS_URL") or None,
            backend_token=token or DEV_BACKEND_TOKEN,
            token_is_default=token in ("", DEV_BACKEND_TOKEN),
            provider=env.choice("PROVIDER", ProviderName, DEFAULT_PROVIDER),
            scripted=ScriptedSettings(
                ttft_ms=env.number("SCRIPTED_TTFT_MS", DEFAULT_SCRIPTED_TTFT_MS),
                tokens_per_s=env.number("SCRIPTED_TOKENS_PER_S", DEFAULT_SCRIPTED_TOKENS_PER_S),
                reply_tokens=env.integer("SCRIPTED_REPLY_TOKENS", DEFAULT_SCRIPTED_REPLY_TOKENS),
                directives=env.flag("SCRIPTED_DIRECTIVES", False),
            ),
            openai=OpenAISettings(
                base_url=environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL,
                api_key=environ.get("OPENAI_API_KEY", ""),
                model=environ.get("OPENAI_MODEL") or DEFAULT_OPENAI_MODEL,
                max_retries=env.integer("OPENAI_MAX_RETRIES", DEFAULT_OPENAI_MAX_RETRIES),
            ),
            max_output_tokens=env.integer("MAX_OUTPUT_TOKENS", DEFAULT_MAX_OUTPUT_TOKENS, low=1),
            budget=_budget(env, environ),
            tasks=_tasks(env, environ),
            history_messages=env.integer("HISTORY_MESSAGES", DEFAULT_HISTORY_MESSAGES),
            history_cap=env.integer("HISTORY_CAP", DEFAULT_HISTORY_CAP, low=1),
            history_ttl_s=env.integer("HISTORY_TTL_S", DEFAULT_HISTORY_TTL_S, low=60),
            flush_window_ms=env.number("FLUSH_WINDOW_MS", DEFAULT_FLUSH_WINDOW_MS),
            max_content_chars=max_chars,
            max_body_bytes=env.integer("MAX_BODY_BYTES", default_body, low=1024),
            first_token_timeout_s=env.number(
                "MODEL_FIRST_TOKEN_TIMEOUT_S", DEFAULT_FIRST_TOKEN_TIMEOUT_S, low=0.01
            ),
            idle_timeout_s=env.number("MODEL_IDLE_TIMEOUT_S", DEFAULT_IDLE_TIMEOUT_S, low=0.01),
            total_timeout_s=env.number("MODEL_TOTAL_TIMEOUT_S", DEFAULT_TOTAL_TIMEOUT_S, low=0.01),
            buffer_ttl_s=env.integer("GENERATION_BUFFER_TTL_S", DEFAULT_BUFFER_TTL_S, low=1),
            idempotency_ttl_s=env.integer("IDEMPOTENCY_TTL_S", DEFAULT_IDEMPOTENCY_TTL_S, low=1),
            ping_interval_s=env.number("SSE_PING_INTERVAL_S", DEFAULT_PING_INTERVAL_S, low=0.01),
            lease_s=env.number("GENERATION_LEASE_S", DEFAULT_LEASE_S, low=0.3),
            room_queue_max=env.integer("ROOM_QUEUE_MAX", DEFAULT_ROOM_QUEUE_MAX),
            room_lock_ttl_s=env.number("ROOM_LOCK_TTL_S", DEFAULT_ROOM_LOCK_TTL_S, low=0.3),
            room_queue_wait_s=env.number("ROOM_QUEUE_WAIT_S", DEFAULT_ROOM_QUEUE_WAIT_S, low=0.01),
            room_busy_retry_s=env.number("ROOM_BUSY_RETRY_S", DEFAULT_ROOM_BUSY_RETRY_S, low=0.001),
            redis_max_connections=env.integer(
                "REDIS_MAX_CONNECTIONS", DEFAULT_REDIS_MAX_CONNECTIONS, low=2
            ),
            redis_timeout_s=env.number("REDIS_TIMEOUT_S", DEFAULT_REDIS_TIMEOUT_S, low=0.01),
            system_prompt=environ.get("SYSTEM_PROMPT") or DEFAULT_SYSTEM_PROMPT,
            log_level=(environ.get("LOG_LEVEL") or DEFAULT_LOG_LEVEL).upper(),
            tracing=traces_enabled(environ),
            service_name=service_name(environ, DEFAULT_SERVICE_NAME),
        )


def _budget(env: _Env, environ: Mapping[str, str]) -> BudgetSettings:
    budget = BudgetSettings(
        prices=parse_prices(environ.get("MODEL_PRICES") or DEFAULT_MODEL_PRICES),
        user_daily_tokens=env.optional_integer("BUDGET_USER_DAILY_TOKENS"),
        user_daily_usd=env.optional_number("BUDGET_USER_DAILY_USD"),
        service_daily_usd=env.optional_number("BUDGET_SERVICE_DAILY_USD"),
        prompt_reserve_tokens=env.integer(
            "BUDGET_PROMPT_RESERVE_TOKENS", DEFAULT_BUDGET_PROMPT_RESERVE_TOKENS
        ),
    )
    model = model_name(environ)
    budget = replace(budget, model=model)
    priced = budget.user_daily_usd is not None or budget.service_daily_usd is not None
    if priced and model not in budget.prices and ANY_MODEL not in budget.prices:
        raise SettingsError(f"MODEL_PRICES has no price for the model in use ({model!r})")
    return budget


def model_name(environ: Mapping[str, str]) -> str:
    """The name ``MODEL_PRICES`` is looked up by: the OpenAI model, or ``scripted``."""
    provider = (environ.get("PROVIDER") or DEFAULT_PROVIDER).strip().lower()
    if provider == ProviderName.OPENAI.value:
        return environ.get("OPENAI_MODEL") or DEFAULT_OPENAI_MODEL
    return provider


def _tasks(env: _Env, environ: Mapping[str, str]) -> TaskSettings:
    url = (environ.get("TASK_WEBHOOK_URL") or "").strip() or None
    secret = (environ.get("TASK_WEBHOOK_SECRET") or "").strip()
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError("TASK_WEBHOOK_URL must be an http:// or https:// URL")
        if len(secret) < MIN_WEBHOOK_SECRET_CHARS:
            raise SettingsError(
                f"TASK_WEBHOOK_URL needs TASK_WEBHOOK_SECRET (at least "
                f"{MIN_WEBHOOK_SECRET_CHARS} characters) to sign the deliveries"
            )
    return TaskSettings(
        workers=env.integer("TASK_WORKERS", DEFAULT_TASK_WORKERS, high=256),
        claim_idle_s=env.number("TASK_CLAIM_IDLE_S", DEFAULT_TASK_CLAIM_IDLE_S, low=0.5, high=3600),
        max_attempts=env.integer("TASK_MAX_ATTEMPTS", DEFAULT_TASK_MAX_ATTEMPTS, low=1, high=20),
        timeout_s=env.number("TASK_TIMEOUT_S", DEFAULT_TASK_TIMEOUT_S, low=1, high=86_400),
        ttl_s=env.integer("TASK_TTL_S", DEFAULT_TASK_TTL_S, low=60),
        queue_max=env.integer("TASK_QUEUE_MAX", DEFAULT_TASK_QUEUE_MAX, low=1),
        batch_max_tokens=env.integer("BATCH_MAX_TOKENS", DEFAULT_BATCH_MAX_TOKENS, low=1),
        webhook_url=url,
        webhook_secret=secret if url else "",  # only a webhook's deliveries are signed
        webhook_max_attempts=env.integer(
            "TASK_WEBHOOK_MAX_ATTEMPTS", DEFAULT_TASK_WEBHOOK_MAX_ATTEMPTS, low=1, high=20
        ),
        webhook_timeout_s=env.number(
            "TASK_WEBHOOK_TIMEOUT_S", DEFAULT_TASK_WEBHOOK_TIMEOUT_S, low=0.1, high=300
        ),
    )


class _Env:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def optional_integer(self, name: str) -> int | None:
        return None if self._raw(name) is None else self.integer(name, 0)

    def optional_number(self, name: str) -> float | None:
        return None if self._raw(name) is None else self.number(name, 0.0)

    def integer(self, name: str, default: int, *, low: int = 0, high: float = float("inf")) -> int:
        raw = self._raw(name)
        try:
            value = default if raw is None else int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer") from None
        if value < low:
            raise SettingsError(f"{name} must be >= {low}")
        if value > high:
            raise SettingsError(f"{name} must be <= {high:g}")
        return value

    def number(
        self, name: str, default: float, *, low: float = 0.0, high: float = float("inf")
    ) -> float:
        raw = self._raw(name)
        try:
            value = default if raw is None else float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number") from None
        if not value >= low:  # also rejects NaN
            raise SettingsError(f"{name} must be >= {low}")
        if value > high:
            raise SettingsError(f"{name} must be <= {high:g}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name} must be a boolean (1/0, true/false)")

    def choice(self, name: str, enum: type[ProviderName], default: str) -> ProviderName:
        raw = (self._raw(name) or default).lower()
        try:
            return enum(raw)
        except ValueError:
            allowed = ", ".join(e.value for e in enum)
            raise SettingsError(f"{name} must be one of: {allowed}") from None
