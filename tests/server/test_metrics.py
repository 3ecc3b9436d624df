"""The metric names are a contract (dashboard, alerts): check them on a real scrape."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from typing import Any

import pytest

from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests.server.server_support import compress, compress_requests, header, make_cache

CONTRACT = {
    "kvpack_requests_total": "counter",
    "kvpack_request_duration_seconds": "histogram",
    "kvpack_input_bytes_total": "counter",
    "kvpack_kept_bytes_total": "counter",
    "kvpack_output_bytes_total": "counter",
    "kvpack_fetch_bytes_total": "counter",
    "kvpack_compression_ratio": "histogram",
    "kvpack_reconstruction_error": "histogram",
    "kvpack_stage_duration_seconds": "histogram",
    "kvpack_store_bytes": "gauge",
    "kvpack_store_entries": "gauge",
    "kvpack_store_budget_bytes": "gauge",
    "kvpack_store_evictions_total": "counter",
    "kvpack_store_errors_total": "counter",
    "kvpack_inflight_streams": "gauge",
    "kvpack_build_info": "gauge",
}


async def scrape_after_compress(start_server: Any, channels: Any) -> tuple[Any, str]:
    server = await start_server(metrics_port=0)
    # metrics_port=0 disables the endpoint; start one on a free port for this test.
    http = server.metrics.start_http("127.0.0.1", 0)
    try:
        stub = pb_grpc.KVPackStub(channels(server.address))
        scores, keys, values = make_cache(layers=2, n=256)
        h = header(keys, 8, ratio=0.5, store=True, key="m/1")
        await compress(stub, compress_requests(h, scores, keys, values), timeout=30)
        url = f"http://127.0.0.1:{http.port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    finally:
        http.close()
    return server, text


async def test_metric_names_and_values(start_server: Any, channels: Any) -> None:
    server, text = await scrape_after_compress(start_server, channels)
    for name, kind in CONTRACT.items():
        assert f"# TYPE {name} {kind}" in text, name
    get = server.metrics.registry.get_sample_value
    assert get("kvpack_requests_total", {"method": "Compress", "code": "OK"}) == 1
    inp = get("kvpack_input_bytes_total", {"policy": "kvcompose"})
    out = get("kvpack_output_bytes_total", {"policy": "kvcompose"})
    kept = get("kvpack_kept_bytes_total", {"policy": "kvcompose"})
    assert inp == 2 * 2 * (1 * 2 * 256 * 64 * 2) and 0 < out < kept < inp
    assert get("kvpack_compression_ratio_count", {"policy": "kvcompose"}) == 1
    assert get("kvpack_reconstruction_error_count", {"tensor": "key"}) == 2
    assert get("kvpack_stage_duration_seconds_count", {"stage": "encode"}) >= 2
    assert get("kvpack_store_entries", {"store": "memory"}) == 1
    assert get("kvpack_store_budget_bytes", {"store": "memory"}) == 2 << 30
    assert get("kvpack_inflight_streams", {"method": "Compress"}) == 0
    # Closed label sets only: no keys or tenants in any label value.
    assert "m/1" not in text and "default" not in text


async def test_promtool_check_metrics(start_server: Any, channels: Any) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    _, text = await scrape_after_compress(start_server, channels)
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
