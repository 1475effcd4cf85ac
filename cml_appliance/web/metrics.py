"""Prometheus metrics: requests by route and status, latency, the database pool, and gauges
the components report (model replicas waiting to be replaced)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _PoolCollector(Collector):
    def __init__(self, stats: Callable[[], tuple[int, int, int] | None]):
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        if stats is None:
            return
        size, idle, max_size = stats
        yield GaugeMetricFamily("cml_db_pool_connections", "Open connections in the database pool", value=size)
        yield GaugeMetricFamily("cml_db_pool_idle_connections", "Idle connections in the database pool", value=idle)
        yield GaugeMetricFamily("cml_db_pool_in_use_connections", "Connections in use", value=size - idle)
        yield GaugeMetricFamily("cml_db_pool_max_connections", "Largest size of the pool", value=max_size)


class _GaugeCollector(Collector):
    def __init__(self, name: str, documentation: str, value: Callable[[], float]):
        self._name, self._documentation, self._value = name, documentation, value

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self._value())


class Metrics:
    """One registry per application, so several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cml_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "cml_http_request_duration_seconds",
            "Time to answer HTTP requests",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

        # Labelled children looked up once per (method, route, status): labels() is not free.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch_pool(self, stats: Callable[[], tuple[int, int, int] | None]) -> None:
        self.registry.register(_PoolCollector(stats))

    def watch_gauge(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        """A gauge read when /metrics is: `value()` at that moment."""
        self.registry.register(_GaugeCollector(name, documentation, value))

    def render(self) -> bytes:
        return generate_latest(self.registry)
