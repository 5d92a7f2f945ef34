"""Settings of the bridge, read once from the environment by ``__main__``.

Every knob has a ``DEFAULT_*`` constant and an environment variable; bridge/README.md has the
table. Durations carry their unit in the name (``_s``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from contracts import DEFAULT_MAX_CONTENT_CHARS
from contracts.tracing import service_name, traces_enabled

DEFAULT_BACKEND_URL = "http://127.0.0.1:8100"
DEV_BACKEND_TOKEN = "dev-backend-token"
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-0123456789"

DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_FIRST_EVENT_TIMEOUT_S = 5.0
DEFAULT_FIRST_CHUNK_TIMEOUT_S = 20.0
DEFAULT_IDLE_TIMEOUT_S = 30.0
DEFAULT_TOTAL_TIMEOUT_S = 180.0
DEFAULT_RESUME_TIMEOUT_S = 5.0
DEFAULT_MAX_RESUMES = 3
DEFAULT_CANCEL_TIMEOUT_S = 5.0
DEFAULT_QUEUE_WAIT_S = 120.0  # the backend's ROOM_QUEUE_WAIT_S
DEFAULT_UPSTREAM_MAX_CONNECTIONS = 4000
DEFAULT_RATE_LIMIT = 30
DEFAULT_RATE_WINDOW_S = 60
DEFAULT_ROOM_TTL_S = 30 * 86_400  # an unused room's owner record expires after 30 days
DEFAULT_SOCKET_MAX_QUEUE = 1000
DEFAULT_SOCKET_DRAIN_GRACE_S = 2.0
DEFAULT_FLAGS_REFRESH_S = 0.5
# the per-replica breaker (CONTRACT.md section 5, bridge/breaker.py)
DEFAULT_BREAKER_WINDOW_S = 30
MAX_BREAKER_WINDOW_S = 3600  # one bucket per second
DEFAULT_BREAKER_MIN_REQUESTS = 20
DEFAULT_BREAKER_FAILURE_RATIO = 0.2
DEFAULT_BREAKER_OPEN_S = 30.0
MAX_BREAKER_OPEN_S = 3600.0
DEFAULT_BREAKER_PROBES = 3
DEFAULT_STREAMING_PERCENT = 100.0
DEFAULT_CHANNEL = "chat-bridge"
DEFAULT_ROLLOUT_EVAL_S = 15.0
DEFAULT_ROLLOUT_DWELL_S = 600.0
DEFAULT_ROLLOUT_MIN_SAMPLES = 200
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_SERVICE_NAME = "chat-bridge"


class SettingsError(ValueError):
    """An environment variable holds a value the bridge cannot run with."""


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    """Every wait of a relay (ARCHITECTURE.md "The relay", step 6)."""

    connect_s: float = DEFAULT_CONNECT_TIMEOUT_S
    first_event_s: float = DEFAULT_FIRST_EVENT_TIMEOUT_S
    first_chunk_s: float = DEFAULT_FIRST_CHUNK_TIMEOUT_S
    idle_s: float = DEFAULT_IDLE_TIMEOUT_S
    total_s: float = DEFAULT_TOTAL_TIMEOUT_S
    resume_s: float = DEFAULT_RESUME_TIMEOUT_S
    max_resumes: int = DEFAULT_MAX_RESUMES
    cancel_s: float = DEFAULT_CANCEL_TIMEOUT_S
    # Added to the first-chunk wait and the total deadline of a generation whose ``start`` says
    # it waits for its room (``queuePosition``), up to the backend's own bound on that wait.
    queue_wait_s: float = DEFAULT_QUEUE_WAIT_S


@dataclass(frozen=True, kw_only=True)
class FlagDefaults:
    """Flag values used for every field the Redis flag hash does not set."""

    enabled: bool = True
    percent: float = DEFAULT_STREAMING_PERCENT
    allow_users: frozenset[str] = frozenset()
    allow_roles: frozenset[str] = frozenset()
    deny_users: frozenset[str] = frozenset()
    fallback: bool = True


@dataclass(frozen=True, kw_only=True)
class RolloutSettings:
    """The rollout controller (bridge/rollout.py) and its gates (bridge/gates.py)."""

    prometheus_url: str | None = None  # no Prometheus: every gate waits, nothing auto-promotes
    eval_s: float = DEFAULT_ROLLOUT_EVAL_S  # how often the lease holder judges the stage
    dwell_s: float = DEFAULT_ROLLOUT_DWELL_S  # a start's default dwellS
    min_samples: int = DEFAULT_ROLLOUT_MIN_SAMPLES  # a start's default minSamples


@dataclass(frozen=True, kw_only=True)
class BreakerSettings:
    """The per-replica breaker: over ``window_s``, at least ``min_requests`` stream requests and
    more than ``failure_ratio`` of them failed or fell back -> complete path for ``open_s``, then
    ``probes`` requests on the stream path decide."""

    enabled: bool = True
    window_s: int = DEFAULT_BREAKER_WINDOW_S
    min_requests: int = DEFAULT_BREAKER_MIN_REQUESTS
    failure_ratio: float = DEFAULT_BREAKER_FAILURE_RATIO
    open_s: float = DEFAULT_BREAKER_OPEN_S
    probes: int = DEFAULT_BREAKER_PROBES


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the bridge reads from its environment."""

    backend_url: str = DEFAULT_BACKEND_URL
    backend_token: str = DEV_BACKEND_TOKEN
    redis_url: str | None = None
    jwt_secret: str | None = None
    insecure_dev_auth: bool = False
    flags: FlagDefaults = field(default_factory=FlagDefaults)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    timeouts: Timeouts = field(default_factory=Timeouts)
    upstream_max_connections: int = DEFAULT_UPSTREAM_MAX_CONNECTIONS
    rate_limit: int = DEFAULT_RATE_LIMIT
    rate_window_s: int = DEFAULT_RATE_WINDOW_S
    room_ttl_s: int = DEFAULT_ROOM_TTL_S
    max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS
    socket_max_queue: int = DEFAULT_SOCKET_MAX_QUEUE
    socket_drain_grace_s: float = DEFAULT_SOCKET_DRAIN_GRACE_S
    flags_refresh_s: float = DEFAULT_FLAGS_REFRESH_S
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    cors_origins: tuple[str, ...] = ()
    channel: str = DEFAULT_CHANNEL
    log_level: str = DEFAULT_LOG_LEVEL
    # OpenTelemetry traces (contracts/tracing.py: off unless an OTLP endpoint is configured)
    tracing: bool = False
    service_name: str = DEFAULT_SERVICE_NAME

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; raise ``SettingsError`` on bad values."""
        env = _Env(environ)
        return cls(
            backend_url=(env.text("BACKEND_URL") or DEFAULT_BACKEND_URL).rstrip("/"),
            backend_token=env.text("BACKEND_TOKEN") or DEV_BACKEND_TOKEN,
            redis_url=env.text("REDIS_URL"),
            jwt_secret=env.text("JWT_SECRET"),
            insecure_dev_auth=env.flag("BRIDGE_INSECURE_DEV_AUTH", False),
            flags=FlagDefaults(
                enabled=env.flag("CHAT_STREAMING_ENABLED", True),
                percent=env.number(
                    "CHAT_STREAMING_PERCENT", DEFAULT_STREAMING_PERCENT, low=0.0, high=100.0
                ),
                allow_users=env.names("CHAT_STREAMING_ALLOW_USERS"),
                allow_roles=env.names("CHAT_STREAMING_ALLOW_ROLES"),
                deny_users=env.names("CHAT_STREAMING_DENY_USERS"),
                fallback=env.flag("CHAT_STREAMING_FALLBACK", True),
            ),
            rollout=RolloutSettings(
                prometheus_url=(env.text("PROMETHEUS_URL") or "").rstrip("/") or None,
                eval_s=env.number(
                    "BRIDGE_ROLLOUT_EVAL_S", DEFAULT_ROLLOUT_EVAL_S, low=0.2, high=3600.0
                ),
                dwell_s=env.number(
                    "BRIDGE_ROLLOUT_DWELL_S", DEFAULT_ROLLOUT_DWELL_S, low=0.0, high=7 * 86_400.0
                ),
                min_samples=env.integer(
                    "BRIDGE_ROLLOUT_MIN_SAMPLES", DEFAULT_ROLLOUT_MIN_SAMPLES, low=1
                ),
            ),
            timeouts=Timeouts(
                connect_s=env.number("BRIDGE_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S),
                first_event_s=env.number(
                    "BRIDGE_FIRST_EVENT_TIMEOUT_S", DEFAULT_FIRST_EVENT_TIMEOUT_S
                ),
                first_chunk_s=env.number(
                    "BRIDGE_FIRST_CHUNK_TIMEOUT_S", DEFAULT_FIRST_CHUNK_TIMEOUT_S
                ),
                idle_s=env.number("BRIDGE_IDLE_TIMEOUT_S", DEFAULT_IDLE_TIMEOUT_S),
                total_s=env.number("BRIDGE_TOTAL_TIMEOUT_S", DEFAULT_TOTAL_TIMEOUT_S),
                resume_s=env.number("BRIDGE_RESUME_TIMEOUT_S", DEFAULT_RESUME_TIMEOUT_S),
                max_resumes=env.integer("BRIDGE_MAX_RESUMES", DEFAULT_MAX_RESUMES, low=0),
                cancel_s=env.number("BRIDGE_CANCEL_TIMEOUT_S", DEFAULT_CANCEL_TIMEOUT_S),
                queue_wait_s=env.number("BRIDGE_QUEUE_WAIT_S", DEFAULT_QUEUE_WAIT_S),
            ),
            upstream_max_connections=env.integer(
                "BRIDGE_UPSTREAM_MAX_CONNECTIONS", DEFAULT_UPSTREAM_MAX_CONNECTIONS, low=1
            ),
            rate_limit=env.integer("BRIDGE_RATE_LIMIT", DEFAULT_RATE_LIMIT, low=0),
            rate_window_s=env.integer("BRIDGE_RATE_WINDOW_S", DEFAULT_RATE_WINDOW_S, low=1),
            room_ttl_s=env.integer("BRIDGE_ROOM_IDLE_TTL_S", DEFAULT_ROOM_TTL_S, low=60),
            max_content_chars=env.integer(
                "BRIDGE_MAX_CONTENT_CHARS", DEFAULT_MAX_CONTENT_CHARS, low=1
            ),
            socket_max_queue=env.integer(
                "BRIDGE_SOCKET_MAX_QUEUE", DEFAULT_SOCKET_MAX_QUEUE, low=8
            ),
            socket_drain_grace_s=env.number(
                "BRIDGE_SOCKET_DRAIN_GRACE_S", DEFAULT_SOCKET_DRAIN_GRACE_S, low=0.01
            ),
            flags_refresh_s=env.number(
                "BRIDGE_FLAGS_REFRESH_S", DEFAULT_FLAGS_REFRESH_S, low=0.05, high=1.0
            ),
            breaker=BreakerSettings(
                enabled=env.flag("BRIDGE_BREAKER_ENABLED", True),
                window_s=env.integer(
                    "BRIDGE_BREAKER_WINDOW_S",
                    DEFAULT_BREAKER_WINDOW_S,
                    low=1,
                    high=MAX_BREAKER_WINDOW_S,
                ),
                min_requests=env.integer(
                    "BRIDGE_BREAKER_MIN_REQUESTS", DEFAULT_BREAKER_MIN_REQUESTS, low=1
                ),
                failure_ratio=env.number(
                    "BRIDGE_BREAKER_FAILURE_RATIO",
                    DEFAULT_BREAKER_FAILURE_RATIO,
                    low=0.0,
                    high=1.0,
                ),
                open_s=env.number(
                    "BRIDGE_BREAKER_OPEN_S", DEFAULT_BREAKER_OPEN_S, high=MAX_BREAKER_OPEN_S
                ),
                probes=env.integer("BRIDGE_BREAKER_PROBES", DEFAULT_BREAKER_PROBES, low=1),
            ),
            cors_origins=tuple(sorted(env.names("BRIDGE_CORS_ORIGINS"))),
            channel=env.text("BRIDGE_CHANNEL") or DEFAULT_CHANNEL,
            log_level=(env.text("BRIDGE_LOG_LEVEL") or DEFAULT_LOG_LEVEL).upper(),
            tracing=traces_enabled(environ),
            service_name=service_name(environ, DEFAULT_SERVICE_NAME),
        )


class _Env:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def integer(self, name: str, default: int, *, low: int = 0, high: int | None = None) -> int:
        raw = self.text(name)
        try:
            value = default if raw is None else int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer") from None
        if value < low:
            raise SettingsError(f"{name} must be >= {low}")
        if high is not None and value > high:
            raise SettingsError(f"{name} must be <= {high}")
        return value

    def number(
        self, name: str, default: float, *, low: float = 0.001, high: float = float("inf")
    ) -> float:
        raw = self.text(name)
        try:
            value = default if raw is None else float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number") from None
        if not low <= value <= high:  # also rejects NaN
            raise SettingsError(f"{name} must be between {low} and {high}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        parsed = parse_bool(raw)
        if parsed is None:
            raise SettingsError(f"{name} must be a boolean (1/0, true/false)")
        return parsed

    def names(self, name: str) -> frozenset[str]:
        return parse_names(self.text(name) or "")


def parse_bool(raw: str) -> bool | None:
    """``true/false``, ``1/0``, ``yes/no``, ``on/off``; ``None`` for anything else."""
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    return None


def parse_names(raw: str) -> frozenset[str]:
    """A comma-separated list; blanks dropped."""
    return frozenset(part.strip() for part in raw.split(",") if part.strip())
