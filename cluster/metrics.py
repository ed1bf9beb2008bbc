"""Prometheus metrics for a node: read from the node's own counters at scrape time.

Counters that already exist (the WAL writer's, the protocol's) are not mirrored
on every event: a collector reads them when Prometheus scrapes, so the hot path
pays nothing. Only per-request commit latency is observed as it happens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from walrep import node
from walrep.node.writer import SYNC_BUCKETS_S

COMMIT_BUCKETS_S = (
    0.00025,
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    10,
)  # fine around the few milliseconds a commit should take


class _SnapshotCollector(Collector):
    def __init__(self, role: str, writer: node.Writer, snapshot: Callable[[], dict[str, Any]]):
        self.role = role
        self.writer = writer
        self.snapshot = snapshot

    def collect(self) -> Iterable:
        stats = self.writer.stats()
        yield _counter(
            "walrep_entries_appended_total",
            "Entries written to this node's WAL",
            stats.total_entries,
        )
        yield _counter(
            "walrep_bytes_appended_total", "Bytes written to this node's WAL", stats.total_bytes
        )
        yield _counter(
            "walrep_syncs_total", "fsync/fdatasync calls on WAL segments", stats.total_syncs
        )
        yield _counter(
            "walrep_dropped_entries_total",
            "Entries refused because the WAL queue was full (non-blocking appends)",
            stats.dropped_entries,
        )
        yield _counter(
            "walrep_write_errors_total", "Failed WAL writes (retried)", stats.write_errors
        )
        yield _counter(
            "walrep_corrupted_entries_total",
            "Damaged or torn entries found in this node's WAL",
            len(self.writer.repairs),
        )
        yield _gauge(
            "walrep_durable_sequence", "Last sequence covered by a sync", stats.durable_sequence
        )
        yield _gauge("walrep_current_sequence", "Last sequence assigned", stats.current_sequence)
        sync = HistogramMetricFamily("walrep_sync_duration_seconds", "Time one sync takes")
        cumulative, buckets = 0, []
        for bound, count in zip(
            [*map(str, SYNC_BUCKETS_S), "+Inf"], self.writer.sync_bucket_counts, strict=True
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        sync.add_metric([], buckets, self.writer.sync_seconds_sum)
        yield sync
        extra = self.snapshot()
        for name, (kind, help_text, value) in extra.get("plain", {}).items():
            yield (_counter if kind == "counter" else _gauge)(name, help_text, value)
        for name, (help_text, label, values) in extra.get("labelled", {}).items():
            family = GaugeMetricFamily(name, help_text, labels=[label])
            for key, value in values.items():
                family.add_metric([key], value)
            yield family


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    # prometheus_client appends _total itself.
    return CounterMetricFamily(name.removesuffix("_total"), help_text, value=value)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


class NodeMetrics:
    def __init__(self, role: str, writer: node.Writer, snapshot: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(role, writer, snapshot))
        self.commit_latency = Histogram(
            "walrep_commit_latency_seconds",
            "Time from receiving an append to answering it, per ack level",
            ["ack"],
            buckets=COMMIT_BUCKETS_S,
            registry=self.registry,
        )
        # One child per ack level, looked up once: labels() takes a lock and builds a
        # key on every call, which doubled the cost of each observation.
        self._latency_by_ack: dict[str, Any] = {}
        self.server = None

    def observe_commit_latency(self, ack: str, seconds: float) -> None:
        child = self._latency_by_ack.get(ack)
        if child is None:
            child = self._latency_by_ack[ack] = self.commit_latency.labels(ack)
        child.observe(seconds)

    def serve(self, address: str) -> tuple[str, int]:
        """Serve /metrics on HOST:PORT (port 0 picks one); returns the bound address."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=self.registry
        )
        self.server = server
        return server.server_address[:2]

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
