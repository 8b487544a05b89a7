"""I/O metrics shared by every export: per-op counts, bytes, errors and latency percentiles.

Latencies go into a log-linear histogram (each power of two split into ``SUB_BUCKETS`` linear
steps, so a percentile is within 1/SUB_BUCKETS of the truth) that costs a few integer operations
per request and a fixed amount of memory however long the server runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

SUB_BITS = 3
SUB_BUCKETS = 1 << SUB_BITS
MAX_EXPONENT = 40  # 2**40 ns is about 18 minutes: anything longer lands in the last bucket
NUM_BUCKETS = (MAX_EXPONENT + 1) * SUB_BUCKETS


def bucket_index(latency_ns: int) -> int:
    """Bucket of a latency: exact below SUB_BUCKETS, log-linear above."""
    if latency_ns < SUB_BUCKETS:
        return max(latency_ns, 0)
    exponent = latency_ns.bit_length() - 1 - SUB_BITS
    sub = (latency_ns >> exponent) - SUB_BUCKETS
    return min((exponent + 1) * SUB_BUCKETS + sub, NUM_BUCKETS - 1)


def bucket_upper_ns(index: int) -> int:
    """The largest latency that falls into bucket ``index``."""
    if index < SUB_BUCKETS:
        return index
    exponent, sub = divmod(index, SUB_BUCKETS)
    exponent -= 1
    return ((SUB_BUCKETS + sub + 1) << exponent) - 1


@dataclass(frozen=True, slots=True)
class OpStats:
    """A snapshot of one operation's counters. Latencies are in microseconds."""

    op: str
    count: int
    bytes: int
    errors: int
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float
    total_latency_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "count": self.count,
            "bytes": self.bytes,
            "errors": self.errors,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "total_latency_s": self.total_latency_s,
        }


class _OpCounters:
    __slots__ = ("buckets", "bytes", "count", "errors", "lock", "max_ns", "sum_ns")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.bytes = 0
        self.errors = 0
        self.max_ns = 0
        self.sum_ns = 0
        self.buckets = [0] * NUM_BUCKETS


def percentile_ns(buckets: list[int], total: int, fraction: float) -> int:
    """The upper bound of the bucket holding the ``fraction`` quantile."""
    if total == 0:
        return 0
    rank = max(1, int(total * fraction + 0.999999))
    seen = 0
    for index, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return bucket_upper_ns(index)
    return bucket_upper_ns(len(buckets) - 1)


class IoMetrics:
    """Thread-safe per-operation metrics for one export (a ublk device, an NBD export...)."""

    def __init__(
        self, name: str, ops: Iterable[str] = ("read", "write", "flush", "discard", "write_zeroes")
    ) -> None:
        self.name = name
        self._ops: dict[str, _OpCounters] = {op: _OpCounters() for op in ops}
        self._ops_lock = threading.Lock()

    def _counters(self, op: str) -> _OpCounters:
        counters = self._ops.get(op)
        if counters is None:
            with self._ops_lock:
                counters = self._ops.setdefault(op, _OpCounters())
        return counters

    def record(self, op: str, nbytes: int, latency_ns: int, error: bool = False) -> None:
        """Count one completed request."""
        self.record_many(op, 1, 0 if error else nbytes, latency_ns, int(error))

    def record_many(
        self, op: str, count: int, nbytes: int, latency_ns: int, errors: int = 0
    ) -> None:
        """Count ``count`` requests of one batch, each done within ``latency_ns``; ``errors`` of
        them failed and ``nbytes`` is what the others moved. One lock round trip per batch."""
        c = self._counters(op)
        index = bucket_index(latency_ns)
        with c.lock:
            c.count += count
            c.errors += errors
            c.bytes += nbytes
            c.buckets[index] += count
            c.sum_ns += latency_ns * count
            if latency_ns > c.max_ns:
                c.max_ns = latency_ns

    def snapshot(self) -> dict[str, OpStats]:
        """Consistent per-op figures at this moment."""
        result = {}
        for op, c in list(self._ops.items()):
            with c.lock:
                count, nbytes, errors, max_ns, sum_ns = (
                    c.count,
                    c.bytes,
                    c.errors,
                    c.max_ns,
                    c.sum_ns,
                )
                buckets = list(c.buckets)
            result[op] = OpStats(
                op,
                count,
                nbytes,
                errors,
                percentile_ns(buckets, count, 0.50) / 1000,
                percentile_ns(buckets, count, 0.99) / 1000,
                percentile_ns(buckets, count, 0.999) / 1000,
                max_ns / 1000,
                sum_ns / 1e9,
            )
        return result

    def histogram(self, op: str) -> Iterator[tuple[float, int]]:
        """Cumulative (upper bound in seconds, count) pairs, for Prometheus histograms."""
        c = self._counters(op)
        with c.lock:
            buckets = list(c.buckets)
        total = 0
        for index, n in enumerate(buckets):
            total += n
            if n:
                yield bucket_upper_ns(index) / 1e9, total


_registry_lock = threading.Lock()
_exported: dict[str, IoMetrics] = {}
_server_started: set[int] = set()


def register(metrics: IoMetrics) -> None:
    """Make ``metrics`` visible on the Prometheus endpoint (if one is served)."""
    with _registry_lock:
        _exported[metrics.name] = metrics


def unregister(metrics: IoMetrics) -> None:
    with _registry_lock:
        _exported.pop(metrics.name, None)


class _Collector:
    """Exposes every registered IoMetrics as vdisk_io_* families."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily(
            "vdisk_io_requests", "Completed requests", labels=["device", "op"]
        )
        errors = CounterMetricFamily("vdisk_io_errors", "Failed requests", labels=["device", "op"])
        nbytes = CounterMetricFamily("vdisk_io_bytes", "Bytes transferred", labels=["device", "op"])
        latency = HistogramMetricFamily(
            "vdisk_io_latency_seconds", "Request latency", labels=["device", "op"]
        )
        with _registry_lock:
            exported = list(_exported.values())
        for metrics in exported:
            for op, stats in metrics.snapshot().items():
                labels = [metrics.name, op]
                requests.add_metric(labels, stats.count)
                errors.add_metric(labels, stats.errors)
                nbytes.add_metric(labels, stats.bytes)
                buckets = [(f"{le:.9g}", n) for le, n in metrics.histogram(op)]
                buckets.append(("+Inf", stats.count))
                latency.add_metric(labels, buckets, sum_value=stats.total_latency_s)
        yield from (requests, errors, nbytes, latency)


def serve_prometheus(port: int, addr: str = "127.0.0.1") -> None:
    """Start (once per port) an HTTP endpoint serving every registered IoMetrics."""
    from prometheus_client import REGISTRY, start_http_server

    with _registry_lock:
        if port in _server_started:
            return
        first = not _server_started
        _server_started.add(port)
    if first:  # outside the lock: register() calls collect(), which takes it
        REGISTRY.register(_Collector())  # type: ignore[arg-type]
    start_http_server(port, addr=addr)
