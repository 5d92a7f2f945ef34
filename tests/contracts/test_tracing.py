"""When the services trace: the standard OTEL_* variables, off by default."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanContext, TraceFlags

from contracts.tracing import format_traceparent, service_name, traces_enabled


@pytest.mark.parametrize(
    ("environ", "enabled"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, True),
    ],
)
def test_traces_are_on_only_with_an_otlp_exporter_configured(
    environ: dict[str, str], enabled: bool
) -> None:
    assert traces_enabled(environ) is enabled


def test_service_name_defaults_per_service_and_obeys_otel_service_name() -> None:
    assert service_name({}, "chat-bridge") == "chat-bridge"
    assert service_name({"OTEL_SERVICE_NAME": "edge-bridge"}, "chat-bridge") == "edge-bridge"


def test_traceparent_is_w3c() -> None:
    ctx = SpanContext(trace_id=0xABC, span_id=0x12, is_remote=False, trace_flags=TraceFlags(1))
    assert format_traceparent(ctx) == "00-" + "0" * 29 + "abc-" + "0" * 14 + "12-01"
