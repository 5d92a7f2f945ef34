"""Traces across the two services (CONTRACT.md sections 2 and 6): W3C ``traceparent`` from the
bridge, continued by the backend; both export OTLP over HTTP, configured by the standard
``OTEL_*`` environment variables.

Off by default: a service traces only when an OTLP endpoint is configured
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``) or
``OTEL_TRACES_EXPORTER=otlp`` is set, and never with ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none``. The rest (endpoint, headers, sampler, batch sizes, resource
attributes) the OpenTelemetry SDK reads from the environment itself.

Spans are made per request and per stage, never per chunk: a stage whose time is known only at
the end (a backend's first token, say) is recorded then, with its real timestamp.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanContext

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SHUTDOWN_TIMEOUT_MS = 2000


def traces_enabled(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {
        name.strip().lower()
        for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip()
    }
    if exporters:
        return "otlp" in exporters
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARS)


def service_name(environ: Mapping[str, str], default: str) -> str:
    return environ.get("OTEL_SERVICE_NAME", "").strip() or default


def make_provider(name: str) -> TracerProvider:
    """A tracer provider exporting to OTLP/HTTP in batches, from a background thread."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def shutdown(provider: TracerProvider) -> None:
    """Export what is buffered (bounded), then stop the exporter thread."""
    provider.force_flush(SHUTDOWN_TIMEOUT_MS)
    provider.shutdown()


def format_traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class MonotonicClock:
    """``time.monotonic()`` readings (what the services time stages with) as epoch ns."""

    def __init__(self) -> None:
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._offset_ns
