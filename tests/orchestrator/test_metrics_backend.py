"""The gateway's /metrics exports the expert backend's own counters (read at scrape time)."""

from __future__ import annotations

from concilium.experts.base import Generation, backend_stats
from concilium.orchestrator.metrics import Metrics


class _Backend:
    def __init__(self) -> None:
        self.counters = {"demo-moe": {"adapter_loads": 2.0, "retries": 1.0}}

    def stats(self) -> dict[str, dict[str, float]]:
        return self.counters


def test_backend_counters_are_read_at_scrape_time() -> None:
    backend = _Backend()
    m = Metrics()
    m.watch_backend(lambda: backend_stats(backend))
    text = m.render().decode()
    assert 'concilium_expert_events_total{event="adapter_loads",model="demo-moe"} 2.0' in text
    assert 'concilium_expert_events_total{event="retries",model="demo-moe"} 1.0' in text
    backend.counters["demo-moe"]["adapter_loads"] = 5.0
    assert 'event="adapter_loads",model="demo-moe"} 5.0' in m.render().decode()


def test_a_backend_without_counters_exports_nothing() -> None:
    m = Metrics()
    m.watch_backend(lambda: backend_stats(object()))
    assert "concilium_expert_events_total{" not in m.render().decode()


def test_ray_backend_sums_the_latest_counters_of_every_replica() -> None:
    from concilium.deployments.gateway import RayBackend

    b = RayBackend({}, local=None, deployment=None)  # type: ignore[arg-type]

    def gen(replica: str, loads: int) -> Generation:
        stats = {"adapter_loads": loads, "adapter_evictions": 1}
        return Generation("x", 1, 1, "stop", replica={"id": replica, "model": "m", "stats": stats})

    b._heard(gen("r1", 1))
    b._heard(gen("r1", 3))  # a later snapshot of the same replica replaces the earlier one
    b._heard(gen("r2", 2))
    b._heard(Generation("x", 1, 1, "stop"))  # an in-process generation carries none
    b.retried["m"] += 1
    assert b.stats() == {"m": {"adapter_loads": 5.0, "adapter_evictions": 2.0, "retries": 1.0}}
