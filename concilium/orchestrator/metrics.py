"""Prometheus metrics for one app instance (its own CollectorRegistry: no module-level state)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Requests, latency, routing decisions per expert, fallbacks, cost and active parameters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "concilium_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "concilium_request_latency_seconds",
            "End-to-end latency.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "concilium_routing_decisions",
            "Requests answered per expert.",
            ["router", "expert"],
            registry=r,
        )
        self.fallbacks = Counter(
            "concilium_fallbacks", "Experts that failed and were skipped.", ["expert"], registry=r
        )
        self.cost = Counter(
            "concilium_cost", "Accumulated cost of answered requests.", ["expert"], registry=r
        )
        self.active_params = Histogram(
            "concilium_active_parameters",
            "Active parameters per response (CoE's metric).",
            buckets=(1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11),
            registry=r,
        )
        self.active_params_mean = Gauge(
            "concilium_active_parameters_mean",
            "Average active parameters per response since start (CoE's headline metric).",
            registry=r,
        )
        self.strategies = Counter(
            "concilium_strategy_requests",
            "Requests per routing strategy (single, ensemble, cascade).",
            ["strategy"],
            registry=r,
        )
        self.expert_calls = Counter(
            "concilium_expert_calls",
            "Expert generations run (every ensemble member and cascade stage counts).",
            ["expert"],
            registry=r,
        )
        self.escalations = Counter(
            "concilium_cascade_escalations", "Cascade stages escalated past.", registry=r
        )
        self._active_sum = 0.0
        self._active_n = 0
        self.registry_version = Gauge(
            "concilium_registry_version", "Registry version seen.", registry=r
        )

    def watch_backend(self, stats: Callable[[], Mapping[str, Mapping[str, float]]]) -> None:
        """Export the expert backend's own counters ({model: {event: n}}, read at scrape time):
        on Serve, adapter loads/evictions and mixed-adapter batches summed over the replicas, and
        the gateway's retries of requests whose replica died."""
        self.registry.register(_BackendCollector(stats))

    def observe_routing(self, routing: Mapping[str, Any]) -> None:
        self.decisions.labels(routing["router"], routing["expert"]).inc()
        cost = float(routing["cost"])  # a remote's odd usage may make it negative or NaN
        self.cost.labels(routing["expert"]).inc(cost if math.isfinite(cost) and cost > 0 else 0.0)
        fallbacks = list(routing["fallbacks"])
        failed = [routing["experts"][0], *fallbacks[:-1]] if fallbacks else []
        for name in failed:
            self.fallbacks.labels(name).inc()
        self.strategies.labels(routing.get("strategy", "single")).inc()
        for m in routing.get("members") or [{"expert": routing["expert"]}]:
            self.expert_calls.labels(m["expert"]).inc()
        self.escalations.inc(int(routing.get("escalations", 0)))
        if routing.get("active_parameters"):
            active = float(routing["active_parameters"])
            self.active_params.observe(active)
            self._active_sum += active
            self._active_n += 1
            self.active_params_mean.set(self._active_sum / self._active_n)
        self.registry_version.set(float(routing.get("registry_version", 0)))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BackendCollector(Collector):
    """`concilium_expert_events_total{model, event}` from a backend's counters."""

    def __init__(self, stats: Callable[[], Mapping[str, Mapping[str, float]]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(
            "concilium_expert_events",
            "Serving events per model: adapter_loads, adapter_evictions, batches, "
            "mixed_adapter_batches, cancelled, tier_hits, tier_misses, tier_prefetched, "
            "tier_bytes_moved (summed over replicas), retries (replica died).",
            labels=["model", "event"],
        )
        for model, events in sorted(self.stats().items()):
            for event, n in sorted(events.items()):
                fam.add_metric([model, event], float(n))
        yield fam

    def describe(self) -> Iterator[Metric]:
        return iter(())
