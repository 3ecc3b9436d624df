"""The deployment's assumptions, checked against real `kvpack serve` processes (no Docker).

* The image's HEALTHCHECK script answers 0 for a serving server and 1 for a dead one, over
  plaintext and over TLS/mTLS.
* Every metric the dashboard and the alert rules query is exported by a live server that has
  served real Compress/Put/Fetch calls, with the labels the queries match on; the scrape passes
  `promtool check metrics`.
* The compose topology: two replicas on one Redis store (each with this test's own key prefix)
  serve each other's entries, bytes-identical and decoding equal, and a round-robin gRPC channel
  over both (the client-side balancing docs/DEPLOY.md describes for Kubernetes) reaches both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvpack import codec, wire
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests import certs
from tests.deploy.deploy_support import (  # promtool_fixture provides the `promtool` fixture
    HEALTHCHECK,
    PROMETHEUS_SYNTHETIC,
    Served,
    Servers,
    dashboard_expressions,
    free_port,
    promql_label_matchers,
    promql_metric_names,
    promtool_fixture,  # noqa: F401
    promtool_path,
    rule_expressions,
)
from tests.server.server_support import compress_requests, header

REDIS_URL = "redis://127.0.0.1:6379/0"
TIMEOUT = 30.0
#: Labels Prometheus attaches to every scraped series (not part of the exposition).
TARGET_LABELS = frozenset({"instance", "job"})

# -- raw gRPC calls (kvpack.v1 stubs; the deployment must work with any client) -----------------


def stub(target: str) -> pb_grpc.KVPackStub:
    return pb_grpc.KVPackStub(grpc.insecure_channel(target))


def put(target: str, key: str, blob: bytes) -> pb.PutResponse:
    def requests() -> Iterator[pb.PutRequest]:
        header = pb.PutHeader(key=key, total_bytes=len(blob), crc32=zlib.crc32(blob))
        yield pb.PutRequest(header=header)
        for chunk in wire.iter_chunks(blob):
            yield pb.PutRequest(chunk=chunk)

    reply: pb.PutResponse = stub(target).Put(requests(), timeout=TIMEOUT)
    return reply


def fetch(target_or_stub: str | pb_grpc.KVPackStub, key: str) -> bytes:
    s = stub(target_or_stub) if isinstance(target_or_stub, str) else target_or_stub
    out = bytearray()
    for message in s.Fetch(pb.FetchRequest(key=key), timeout=TIMEOUT):
        assert message.chunk.offset == len(out)
        out += message.chunk.data
        assert len(out) <= message.total_bytes
    return bytes(out)


def random_cache(
    layers: int = 2, heads: int = 2, seq: int = 64, dim: int = 16
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per-layer keys/values ``[1, heads, seq, dim]`` fp32; scores ``[layers, 1, heads, seq]``."""
    g = torch.Generator().manual_seed(9)
    keys = [torch.randn(1, heads, seq, dim, generator=g) for _ in range(layers)]
    values = [torch.randn(1, heads, seq, dim, generator=g) for _ in range(layers)]
    scores = torch.rand(layers, 1, heads, seq, generator=g)
    return keys, values, scores


def compress(target: str, key: str) -> pb.CompressSummary:
    """One real Compress stream (KVCompose, half the tokens, lossy store) of a random cache."""
    keys, values, scores = random_cache()
    h = header(
        keys,
        keys[0].shape[1],
        ratio=0.5,
        quant=pb.QuantSettings(mode="lossy"),
        store=True,
        key=key,
    )
    requests = compress_requests(h, scores, keys, values)
    summaries = [
        r.summary
        for r in stub(target).Compress(requests, timeout=TIMEOUT)
        if r.WhichOneof("msg") == "summary"
    ]
    assert len(summaries) == 1
    return summaries[0]


# -- metrics ------------------------------------------------------------------------------------


def scrape(served: Served) -> str:
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """(series names a query may select, label names seen per series name) of an exposition.

    A family without samples (a labelled metric no call has touched yet) still counts through its
    TYPE: counter -> name_total, histogram -> name_bucket/_sum/_count, gauge -> name.
    """
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Served]]:
    """The compose topology without Docker: two `kvpack serve --store redis` on the real Redis,
    sharing a key prefix of this module's own. Every key under it is deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError as e:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {REDIS_URL} is down (.ci/run starts it): {e}")
        pytest.skip(f"needs the real Redis at {REDIS_URL}: {e}")
    prefix = f"kvpack-deploy-test-{uuid.uuid4().hex}:"
    servers = Servers(tmp_path_factory.mktemp("serve"))
    try:
        a, b = servers(
            "--store", "redis", "--redis-url", REDIS_URL, "--redis-prefix", prefix, replicas=2
        )
        yield a, b
    finally:
        servers.stop()
        stale = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if stale:
            client.delete(*stale)
        assert not list(client.scan_iter(match=f"{prefix}*")), "Redis keys left behind"
        client.close()


def _probe(**env: str) -> subprocess.CompletedProcess[str]:
    """Run deploy/healthcheck.py (the image's kvpack-healthcheck) with only ``env``'s KVPACK_*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVPACK_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env={**clean, "KVPACK_HEALTHCHECK_TIMEOUT": "3", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.redis  # runs on the `replicas` pair sharing the real Redis
def test_healthcheck_script_probes_the_grpc_health_service(
    replicas: tuple[Served, Served],
) -> None:
    served = replicas[0]

    ok = _probe(KVPACK_PORT=str(served.port))
    assert ok.returncode == 0, ok.stderr
    assert _probe(KVPACK_HEALTHCHECK_ADDR=served.target).returncode == 0
    dead = _probe(KVPACK_PORT=str(free_port()))
    assert dead.returncode == 1
    assert "kvpack-healthcheck" in dead.stderr


@pytest.mark.redis  # runs on the `replicas` pair sharing the real Redis
def test_dashboard_and_alerts_query_only_exported_metrics(
    replicas: tuple[Served, Served],
) -> None:
    served = replicas[0]
    summary = compress(served.target, "metrics-compress")
    assert summary.stored_bytes > 0 and summary.compression_ratio > 1
    keys, values, _ = random_cache()
    put(served.target, "metrics-put", codec.encode(keys, values))
    assert fetch(served.target, "metrics-compress")
    with pytest.raises(grpc.RpcError) as missing:
        fetch(served.target, "metrics-missing")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    text = scrape(served)
    names, labels = exported(text)
    # The calls above left samples in every family the dashboard's main panels read.
    for sample in (
        "kvpack_requests_total",
        "kvpack_request_duration_seconds_bucket",
        "kvpack_input_bytes_total",
        "kvpack_output_bytes_total",
        "kvpack_compression_ratio_bucket",
        "kvpack_reconstruction_error_bucket",
        "kvpack_store_bytes",
    ):
        assert sample in labels, f"{sample} has no samples after real calls"
    codes = {
        line.split('code="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("kvpack_requests_total{")
    }
    assert {"OK", "NOT_FOUND"} <= codes, "the rules and panels match code on gRPC status names"

    problems = []
    for where, expr in dashboard_expressions() + rule_expressions():
        for name in sorted(promql_metric_names(expr) - PROMETHEUS_SYNTHETIC):
            if name not in names:
                problems.append(f"{where}: {name} is not exported")
        for name, label in promql_label_matchers(expr):
            if name in PROMETHEUS_SYNTHETIC or label in TARGET_LABELS or name not in labels:
                continue
            if label not in labels[name]:
                problems.append(f"{where}: {name} has no label {label!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.redis  # runs on the `replicas` pair sharing the real Redis
def test_scrape_passes_promtool_check_metrics(
    replicas: tuple[Served, Served], promtool: str
) -> None:
    served = replicas[1]
    compress(served.target, "lint-compress")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=scrape(served),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert promtool_path() == promtool


def counter(served: Served, method: str, code: str = "OK") -> float:
    for family in text_string_to_metric_families(scrape(served)):
        for sample in family.samples:
            if sample.name == "kvpack_requests_total" and sample.labels == {
                "method": method,
                "code": code,
            }:
                return float(sample.value)
    return 0.0


@pytest.mark.redis  # runs on the `replicas` pair sharing the real Redis
def test_two_replicas_share_one_redis_store(replicas: tuple[Served, Served]) -> None:
    a, b = replicas

    # A container written through replica A is fetched through replica B, byte for byte.
    keys, values, _ = random_cache()
    blob = codec.encode(keys, values)
    assert put(a.target, "shared-put", blob).stored_bytes == len(blob)
    via_b = fetch(b.target, "shared-put")
    assert via_b == blob
    want, got = codec.decode(blob), codec.decode(via_b)
    for w, g in zip(want.keys + want.values, got.keys + got.values, strict=True):
        assert torch.equal(w, g)
    for original, decoded in zip(keys, got.keys, strict=True):
        assert decoded.shape == original.shape

    # A cache compressed through B is served by A.
    summary = compress(b.target, "shared-compress")
    from_a = fetch(a.target, "shared-compress")
    assert len(from_a) == summary.stored_bytes
    assert from_a == fetch(b.target, "shared-compress")
    assert len(codec.decode(from_a).keys) == len(keys)

    # Client-side balancing over both replicas (what docs/DEPLOY.md recommends behind a headless
    # Kubernetes Service): every call succeeds, and both replicas serve some. round_robin picks
    # only connected replicas, so on a loaded machine the first calls may all land on the one
    # that connected first: call until both have served (bounded), then check the books.
    before = counter(a, "Fetch"), counter(b, "Fetch")
    config = '{"loadBalancingConfig": [{"round_robin": {}}]}'
    calls, served = 0, (0.0, 0.0)
    with grpc.insecure_channel(
        f"ipv4:{a.target},{b.target}", options=[("grpc.service_config", config)]
    ) as channel:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        balanced = pb_grpc.KVPackStub(channel)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            assert fetch(balanced, "shared-put") == blob
            calls += 1
            served = counter(a, "Fetch") - before[0], counter(b, "Fetch") - before[1]
            if calls >= 4 and min(served) > 0:
                break
    assert min(served) > 0, f"round robin never reached both replicas in {calls} calls"
    assert sum(served) == calls

    # A delete through one replica is seen by the other.
    stub(a.target).Delete(pb.DeleteRequest(key="shared-put"), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as gone:
        fetch(b.target, "shared-put")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def _pki(tmp: Path) -> dict[str, Path]:
    """A CA and a server certificate it signs (also valid for client use, so the healthcheck
    may present it under mTLS), as PEM files."""
    ca = certs.issue("kvpack test CA", ca=True)
    ca_path, _ = certs.write(tmp, "ca", ca)
    cert_path, key_path = certs.write(tmp, "tls", certs.issue("localhost", ca))
    return {"ca": ca_path, "cert": cert_path, "key": key_path}


def test_healthcheck_script_speaks_tls_and_mtls(tmp_path: Path) -> None:
    """The TLS path of kvpack-healthcheck (the Kubernetes exec probe once TLS is on), against a
    real mTLS gRPC health server built the way kvpack's is (ssl_server_credentials with
    require_client_auth)."""
    from concurrent.futures import ThreadPoolExecutor

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    pki = _pki(tmp_path)
    server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [(pki["key"].read_bytes(), pki["cert"].read_bytes())],
        root_certificates=pki["ca"].read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        tls = {
            "KVPACK_PORT": str(port),
            "KVPACK_TLS_CERT": str(pki["cert"]),
            "KVPACK_TLS_KEY": str(pki["key"]),
            "KVPACK_HEALTHCHECK_CA": str(pki["ca"]),
        }
        mtls = {**tls, "KVPACK_TLS_CLIENT_CA": str(pki["ca"])}
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _probe(**mtls).returncode == 0, _probe(**mtls).stderr
        # No client certificate (KVPACK_TLS_CLIENT_CA unset) or plaintext: refused.
        assert _probe(**tls).returncode == 1
        assert _probe(KVPACK_PORT=str(port)).returncode == 1
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        refused = _probe(**mtls)
        assert refused.returncode == 1 and "NOT_SERVING" in refused.stderr
    finally:
        server.stop(None)
