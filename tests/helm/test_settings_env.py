"""Every setting the services read is settable through the chart's values, in a form the services
accept, and the chart's defaults are the services' own defaults (helm/README.md "Settings")."""

from __future__ import annotations

from typing import Any

import pytest

from backend_stream.settings import OpenAISettings
from backend_stream.settings import Settings as BackendSettings
from bridge.settings import Settings as BridgeSettings
from tests.helm.chart import (
    COMPUTED_VARS,
    FULLNAME,
    JWT,
    OPENAI_KEY,
    OPTIONAL_SECRET_VARS,
    SECRET_VARS,
    TOKEN,
    chart_values,
    container,
    render,
    resolved_env,
    settings_env_names,
)

COMPONENTS = ("bridge", "backend")
SECRETS = {
    "jwtSecret": JWT,
    "backendToken": TOKEN,
    "openaiApiKey": OPENAI_KEY,
    "taskWebhookSecret": "webhook-secret-given-in-values-0123",
}


def sample(schema: dict[str, Any], current: Any) -> Any:
    """A value the schema admits that differs from the chart's default ``current``."""
    options = schema.get("anyOf", [schema])
    if any(o.get("type") == "array" for o in options):
        return ["alpha", "beta"]
    typed = next(o for o in options if o.get("const") != "")
    if "enum" in typed:
        return next(v for v in reversed(typed["enum"]) if v != current)
    kind = typed.get("type")
    if "examples" in typed:  # a structured value (MODEL_PRICES' JSON): the chart's own example
        return typed["examples"][0]
    if kind == "boolean":
        return not current if isinstance(current, bool) else True
    if kind in ("integer", "number"):
        low = typed.get("minimum", typed.get("exclusiveMinimum", 0))
        high = typed.get("maximum", low + 100)
        middle = (low + high) / 2
        return int(middle) + 1 if kind == "integer" else round(middle, 3) + 0.25
    if kind == "string" and "pattern" in typed:
        return "http://upstream.chat.test:9123"
    return "sample text, with a comma"


def samples(component: str) -> dict[str, Any]:
    from helm_python import Chart

    from tests.helm.chart import CHART

    with Chart.load(CHART) as chart:
        schema = chart.schema
    assert schema is not None
    env_schema = schema["properties"][component]["properties"]["env"]["properties"]
    defaults = chart_values()[component]["env"]
    return {name: sample(env_schema[name], defaults[name]) for name in env_schema}


def as_env_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


@pytest.mark.parametrize("component", COMPONENTS)
def test_code_and_chart_know_the_same_settings(component: str) -> None:
    in_code = settings_env_names(component)
    in_chart = set(chart_values()[component]["env"])
    by_chart = SECRET_VARS[component] | OPTIONAL_SECRET_VARS.get(component, set()) | COMPUTED_VARS
    assert in_code - in_chart - by_chart == set(), "settings the chart cannot set"
    assert in_chart - in_code == set(), "chart settings no service reads"
    assert by_chart <= in_code


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_setting_reaches_the_container_in_a_form_the_service_accepts(
    component: str,
) -> None:
    values = samples(component)
    docs = render({component: {"env": values}, "secrets": SECRETS})
    env = resolved_env(docs, component)
    for name, value in values.items():
        assert env.get(name) == as_env_text(value), name
    settings = BridgeSettings.from_env(env) if component == "bridge" else None
    if settings is not None:
        assert settings.backend_url == "http://upstream.chat.test:9123"
        assert settings.flags.allow_roles == frozenset({"alpha", "beta"})
        assert settings.room_ttl_s == values["BRIDGE_ROOM_IDLE_TTL_S"]
    else:
        backend = BackendSettings.from_env(env)
        assert backend.provider.value == values["PROVIDER"] == "openai"
        assert backend.openai.api_key == OPENAI_KEY
        assert backend.history_ttl_s == values["HISTORY_TTL_S"]


def test_large_whole_numbers_are_written_as_integers() -> None:
    """Regression: Helm holds numbers as float64 and printed 2592000 as "2.592e+06", which the
    services' int() refuses at start-up."""
    docs = render({"bridge": {"env": {"BRIDGE_ROOM_IDLE_TTL_S": 2592000}}})
    (entry,) = [
        e for e in container(docs, "bridge")["env"] if e["name"] == "BRIDGE_ROOM_IDLE_TTL_S"
    ]
    assert entry["value"] == "2592000"


def test_extra_env_is_appended_to_both_containers() -> None:
    extra = [{"name": "OTEL_SERVICE_NAME", "value": "chat"}]
    docs = render({"bridge": {"extraEnv": extra}, "backend": {"extraEnv": extra}})
    for component in COMPONENTS:
        assert container(docs, component)["env"][-1] == extra[0]


def test_chart_defaults_are_the_services_defaults_but_for_the_deployment_ones() -> None:
    docs = render({"secrets": SECRETS})
    redis_url = f"redis://{FULLNAME}-redis:6379/0"
    bridge = BridgeSettings.from_env(resolved_env(docs, "bridge"))
    assert bridge == BridgeSettings(
        backend_url=f"http://{FULLNAME}-backend:8100",
        backend_token=TOKEN,
        redis_url=redis_url,
        jwt_secret=JWT,
    )
    backend = BackendSettings.from_env(resolved_env(docs, "backend"))
    assert backend == BackendSettings(
        redis_url=redis_url,
        backend_token=TOKEN,
        token_is_default=False,
        openai=OpenAISettings(api_key=OPENAI_KEY),
    )


def test_tracing_endpoint_turns_traces_on_in_both_services() -> None:
    assert not BridgeSettings.from_env(resolved_env(render(), "bridge")).tracing
    endpoint = "http://otel-collector.monitoring:4318"
    docs = render({"tracing": {"otlpEndpoint": endpoint}})
    bridge = BridgeSettings.from_env(resolved_env(docs, "bridge"))
    backend = BackendSettings.from_env(resolved_env(docs, "backend"))
    assert bridge.tracing and backend.tracing
    assert (bridge.service_name, backend.service_name) == ("chat-bridge", "chat-backend")
    assert resolved_env(docs, "backend")["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint
