"""Prometheus metrics of one bridge process (exposed at GET /metrics).

prometheus-client directly, with a private registry: the exposition format is the same one the
OTel Prometheus exporter would serve, without an SDK pipeline on the per-chunk path.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PATHS = ("stream", "fallback", "complete")
GATED_FAULTS = ("gap_unrepaired", "content_mismatch")  # bridge/gates.py FAULT_KINDS
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every series the bridge exports; labels are bounded enums (path, reason, code)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "bridge_ttft_seconds", "send_message to first chunk", ["path"], registry=r,
            buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.completion = Histogram(
            "bridge_completion_seconds", "send_message to terminal event", ["path"], registry=r,
            buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.ack = Histogram(
            "bridge_ack_seconds", "send_message to its accepted ack", ["path"], registry=r,
            buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.client_ttft = Histogram(
            "bridge_client_ttft_seconds", "send click to first chunk, as a page reported it",
            registry=r, buckets=LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.requests = Counter(
            "bridge_requests_total", "send_message by path and result", ["path", "ok"], registry=r
        )
        self.fallbacks = Counter(
            "bridge_fallbacks_total", "fallbacks to POST /chat/messages", ["reason"], registry=r
        )
        self.errors = Counter("bridge_errors_total", "failures by code", ["code"], registry=r)
        self.rejections = Counter(
            "bridge_rejections_total", "rejected client events by code", ["code"], registry=r
        )
        self.relay_faults = Counter(
            "bridge_relay_faults_total", "stream faults a relay saw (and repaired or fell back on)",
            ["kind"], registry=r,
        )  # fmt: skip
        self.resumes = Counter("bridge_resumes_total", "stream resumes", registry=r)
        self.duplicates = Counter(
            "bridge_duplicate_chunks_total", "duplicate seq dropped", registry=r
        )
        self.expired_sessions = Counter(
            "bridge_expired_sessions_total", "sockets disconnected at their token's exp", registry=r
        )
        self.active = Gauge("bridge_active_streams", "relays in progress", registry=r)
        self.sockets = Gauge("bridge_connected_sockets", "connected sockets", registry=r)
        self.rollout_percent = Gauge(
            "bridge_rollout_percent",
            "share of users on the stream path (0 when killed)",
            registry=r,
        )
        self.kicks = Gauge(
            "bridge_slow_consumer_disconnects", "sockets dropped over the output bound", registry=r
        )
        self.breaker_open = Gauge(
            "bridge_breaker_open",
            "1 while this replica's breaker sends new requests to the complete path (open or"
            " half open), else 0",
            ["replica"],
            registry=r,
        )
        # Every series a rollout gate reads exists from the start, at 0: Prometheus's
        # ``increase`` over a window misses a counter's first value when its series appears in
        # the window, so the first failures of a stage would go uncounted (bridge/gates.py).
        for path in PATHS:
            for ok in ("true", "false"):
                self.requests.labels(path=path, ok=ok)
            for histogram in (self.ttft, self.completion, self.ack):
                histogram.labels(path=path)
        for kind in GATED_FAULTS:
            self.relay_faults.labels(kind=kind)

    def bind(
        self,
        *,
        sockets: Callable[[], float],
        kicks: Callable[[], float],
        rollout_percent: Callable[[], float],
        replica: str | None = None,
        breaker_open: Callable[[], float] | None = None,
    ) -> None:
        self.sockets.set_function(sockets)
        self.kicks.set_function(kicks)
        self.rollout_percent.set_function(rollout_percent)
        if replica is not None and breaker_open is not None:
            # one series, there from the start (0 while closed): Prometheus always has data
            self.breaker_open.labels(replica=replica).set_function(breaker_open)

    def render(self) -> bytes:
        return generate_latest(self.registry)
