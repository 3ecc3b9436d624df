"""Prometheus metrics of one server instance (own CollectorRegistry, so tests can run several).

The names and labels are a contract with the Grafana dashboard and alert rules (docs/METRICS.md):
add, never rename. Labels come only from closed sets: method (RPC names), code (gRPC status
names), policy (codec registry names + "none"), stage, store, tensor.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable

import grpc
import prometheus_client as prom
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvpack import __version__
from kvpack.v1 import kvpack_pb2 as pb

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATIO_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ERROR_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1)
STAGES = ("stats", "select", "plan", "gather", "encode", "decode", "store", "fetch")
#: Budget mode: the chosen eviction ratio, error bounds, and stored bytes / budget.
TOKEN_RATIO_BUCKETS = (0, 0.25, 0.5, 0.75, 0.875, 0.9375, 0.96875, 0.99, 1)
BOUND_BUCKETS = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.25, 0.4, 0.5, 1)
FILL_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 1)
METHODS = ("Compress", "Fetch", "Put", "Delete", "Stat", "List", "Info")


class Metrics:
    """All kvpack_* metrics, registered in ``self.registry``."""

    def __init__(self, policies: Iterable[str] = (), store: str = "memory") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kvpack_requests",
            "RPCs finished, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "kvpack_request_duration_seconds",
            "RPC wall time, by method",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.input_bytes = Counter(
            "kvpack_input_bytes", "raw K/V bytes received by Compress", ["policy"], registry=r
        )
        self.kept_bytes = Counter(
            "kvpack_kept_bytes", "raw K/V bytes left after eviction", ["policy"], registry=r
        )
        self.output_bytes = Counter(
            "kvpack_output_bytes", "container bytes stored after encoding", ["policy"], registry=r
        )
        self.fetch_bytes = Counter(
            "kvpack_fetch_bytes", "container bytes sent by Fetch", registry=r
        )
        self.compression_ratio = Histogram(
            "kvpack_compression_ratio",
            "per-request input bytes / stored bytes (x)",
            ["policy"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.reconstruction_error = Histogram(
            "kvpack_reconstruction_error",
            "per-layer relative Frobenius error of the encoded kept entries",
            ["tensor"],
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.budget_token_ratio = Histogram(
            "kvpack_budget_token_ratio",
            "per budget-mode Compress: fraction of KV entries evicted by the chosen plan",
            ["policy"],
            buckets=TOKEN_RATIO_BUCKETS,
            registry=r,
        )
        self.budget_error_bound = Histogram(
            "kvpack_budget_error_bound",
            "per budget-mode Compress: chosen relative error bound (fraction of a group's range)",
            ["tensor"],
            buckets=BOUND_BUCKETS,
            registry=r,
        )
        self.budget_fill_ratio = Histogram(
            "kvpack_budget_fill_ratio",
            "per budget-mode Compress: stored bytes / budget bytes (never above 1)",
            buckets=FILL_BUCKETS,
            registry=r,
        )
        self.budget_bytes = Counter(
            "kvpack_budget_bytes", "byte budgets of budget-mode Compress requests", registry=r
        )
        self.budget_stored_bytes = Counter(
            "kvpack_budget_stored_bytes",
            "container bytes stored by budget-mode Compress requests",
            registry=r,
        )
        self.stage_duration = Histogram(
            "kvpack_stage_duration_seconds",
            "time spent per processing stage",
            ["stage"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.store_bytes = Gauge(
            "kvpack_store_bytes",
            "bytes held by the store (this process's view)",
            ["store"],
            registry=r,
        )
        self.store_entries = Gauge(
            "kvpack_store_entries", "entries held by the store", ["store"], registry=r
        )
        self.store_budget_bytes = Gauge(
            "kvpack_store_budget_bytes", "store byte budget (0 = unbounded)", ["store"], registry=r
        )
        self.store_evictions = Counter(
            "kvpack_store_evictions",
            "entries evicted to stay within the budget",
            ["store"],
            registry=r,
        )
        self.store_errors = Counter(
            "kvpack_store_errors",
            "store operations that failed (I/O, connection, corruption)",
            ["store"],
            registry=r,
        )
        self.inflight_streams = Gauge(
            "kvpack_inflight_streams", "RPCs in progress, by method", ["method"], registry=r
        )
        self.build_info = Gauge(
            "kvpack_build_info",
            "build information (always 1)",
            ["version", "python", "torch", "grpc"],
            registry=r,
        )
        self.build_info.labels(
            __version__, platform.python_version(), torch.__version__, grpc.__version__
        ).set(1)
        # Pre-create the closed label sets so dashboards see zeros instead of missing series.
        for method in METHODS:
            self.inflight_streams.labels(method)
            self.request_duration.labels(method)
        for stage in STAGES:
            self.stage_duration.labels(stage)
        for tensor in ("key", "value"):
            self.reconstruction_error.labels(tensor)
            self.budget_error_bound.labels(tensor)
        for policy in (*policies, "none"):
            for m in (self.input_bytes, self.kept_bytes, self.output_bytes):
                m.labels(policy)
        self.store_evictions.labels(store)
        self.store_errors.labels(store)

    # -- the narrow sink a Compress call reports through (server.compress.CompressMetrics) ----

    def stage(self, stage: str, seconds: float) -> None:
        """One pipeline stage of a call took ``seconds``."""
        self.stage_duration.labels(stage).observe(seconds)

    def compressed(self, policy: str, summary: pb.CompressSummary) -> None:
        """A Compress call under ``policy`` ended with ``summary`` (stored when it has a key)."""
        self.input_bytes.labels(policy).inc(summary.input_bytes)
        self.kept_bytes.labels(policy).inc(summary.kept_bytes)
        if not summary.key:
            return
        for layer in summary.layers:
            self.reconstruction_error.labels("key").observe(layer.key_rel_error)
            self.reconstruction_error.labels("value").observe(layer.value_rel_error)
        self.output_bytes.labels(policy).inc(summary.stored_bytes)
        self.compression_ratio.labels(policy).observe(summary.compression_ratio)
        if summary.HasField("budget"):
            b = summary.budget
            self.budget_token_ratio.labels(policy).observe(b.token_ratio)
            self.budget_error_bound.labels("key").observe(b.k_error_bound)
            self.budget_error_bound.labels("value").observe(b.v_error_bound)
            self.budget_fill_ratio.observe(b.stored_bytes / max(1, b.budget_bytes))
            self.budget_bytes.inc(b.budget_bytes)
            self.budget_stored_bytes.inc(b.stored_bytes)

    def scrape(self) -> bytes:
        """The text exposition of this registry (what /metrics serves)."""
        return prom.generate_latest(self.registry)

    def start_http(self, host: str, port: int) -> MetricsHTTP:
        """Serve /metrics on ``host:port`` in a daemon thread (port 0 = any free port)."""
        httpd, thread = prom.start_http_server(port, addr=host, registry=self.registry)
        return MetricsHTTP(httpd, thread)


class MetricsHTTP:
    """A running /metrics endpoint; ``port`` is the bound port."""

    def __init__(self, httpd: object, thread: object) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_port  # type: ignore[attr-defined]

    def close(self) -> None:
        self._httpd.shutdown()  # type: ignore[attr-defined]
        self._httpd.server_close()  # type: ignore[attr-defined]
