"""Prometheus metrics of one backend process (a private registry, so apps in tests don't clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Counters the tests and the load tester read from ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_calls = Counter(
            "backend_model_calls", "Model calls started", ["provider"], registry=r
        )
        self.generations = Counter(
            "backend_generations", "Generations ended, by outcome (finish reason)", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "backend_tokens", "Tokens the model reported, by kind", ["kind"], registry=r
        )
        self.cost_usd = Counter(
            "backend_cost_usd", "Cost of the model's usage (MODEL_PRICES), USD", registry=r
        )
        self.budget_refusals = Counter(
            "backend_budget_refusals", "Requests refused with BUDGET_EXCEEDED, by budget",
            ["budget"], registry=r,
        )  # fmt: skip
        self.errors = Counter("backend_errors", "Errors answered, by code", ["code"], registry=r)
        self.chunks = Counter("backend_chunks", "Chunks flushed", registry=r)
        self.chunk_batches = Counter(
            "backend_chunk_batches", "Redis pipelines that carried chunks", registry=r
        )
        self.active_generations = Gauge(
            "backend_active_generations", "Generations running in this process", registry=r
        )
        self.active_streams = Gauge(
            "backend_active_streams", "SSE responses open on this process", registry=r
        )
        self.room_busy = Counter(
            "backend_room_busy",
            "Requests refused with ROOM_BUSY (the room's queue full)",
            registry=r,
        )
        self.room_wait = Histogram(
            "backend_room_wait_seconds",
            "Time a generation waited for its room's lock (only generations that waited)",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.room_lock_lost = Counter(
            "backend_room_lock_lost",
            "Generations whose room lock lapsed and was taken over before they ended (fenced)",
            registry=r,
        )
        self.tasks = Counter(
            "backend_tasks", "Batch tasks ended, by outcome (done, failed)", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.task_webhooks = Counter(
            "backend_task_webhooks",
            "Task webhook delivery attempts, by result (delivered, retry, gave_up)",
            ["result"],
            registry=r,
        )
        self.first_token = Histogram(
            "backend_model_first_token_seconds",
            "Request receipt to the model's first token",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.first_chunk = Histogram(
            "backend_first_chunk_seconds",
            "Request receipt to the first chunk published",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        # Label children of the per-request counters, kept: ``labels()`` takes a lock and
        # builds a key on every call.
        self._children: dict[tuple[str, str], Counter] = {}

    def count_model_call(self, provider: str) -> None:
        self._child(self.model_calls, "model_calls", provider).inc()

    def count_generation(self, finish: str) -> None:
        self._child(self.generations, "generations", finish).inc()

    def count_tokens(self, prompt: int, completion: int) -> None:
        if prompt:
            self._child(self.tokens, "tokens", "prompt").inc(prompt)
        if completion:
            self._child(self.tokens, "tokens", "completion").inc(completion)

    def _child(self, metric: Counter, name: str, value: str) -> Counter:
        child = self._children.get((name, value))
        if child is None:
            child = self._children[(name, value)] = metric.labels(value)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
