import threading
import urllib.request

import pytest

from vdisk.metrics import (
    NUM_BUCKETS,
    IoMetrics,
    bucket_index,
    bucket_upper_ns,
    register,
    serve_prometheus,
    unregister,
)


def test_buckets_are_monotonic_and_bound_their_values() -> None:
    previous = -1
    for latency in [*range(0, 200), 1000, 4095, 4096, 10**6, 10**9, 10**12]:
        index = bucket_index(latency)
        assert index >= previous
        previous = index
        assert latency <= bucket_upper_ns(index) or index == NUM_BUCKETS - 1
        if index:
            assert latency > bucket_upper_ns(index - 1)


def test_percentiles_within_bucket_precision() -> None:
    m = IoMetrics("t")
    for us in range(1, 1001):  # 1..1000 microseconds, uniform
        m.record("read", 4096, us * 1000)
    m.record("read", 0, 5000, error=True)
    stats = m.snapshot()["read"]
    assert stats.count == 1001 and stats.errors == 1 and stats.bytes == 4096 * 1000
    assert 500 <= stats.p50_us <= 500 * 1.125
    assert 990 <= stats.p99_us <= 990 * 1.125
    assert stats.max_us == 1000.0


def test_record_is_thread_safe() -> None:
    m = IoMetrics("t")

    def work() -> None:
        for _ in range(10000):
            m.record("write", 512, 100)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = m.snapshot()["write"]
    assert stats.count == 80000 and stats.bytes == 80000 * 512


def test_prometheus_endpoint_exposes_registered_metrics(unused_tcp_port: int) -> None:
    m = IoMetrics("dev0")
    m.record("read", 4096, 20000)
    register(m)
    try:
        serve_prometheus(unused_tcp_port)
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{unused_tcp_port}/metrics", timeout=5)
            .read()
            .decode()
        )
    finally:
        unregister(m)
    assert 'vdisk_io_requests_total{device="dev0",op="read"} 1.0' in body
    assert 'vdisk_io_bytes_total{device="dev0",op="read"} 4096.0' in body
    assert "vdisk_io_latency_seconds_bucket" in body


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
