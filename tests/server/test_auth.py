"""Bearer tokens, tenant namespaces, TLS and mTLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpack import codec
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
from tests import certs
from tests.server.server_support import fetch, put_requests

TOKENS = "alpha:tok-alpha,beta:tok-beta"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def blob() -> bytes:
    k = torch.randn(1, 1, 16, 8)
    return codec.encode([k], [k])


async def test_tokens_and_tenants(start_server: Any, channels: Any) -> None:
    server = await start_server(auth_tokens=TOKENS)
    ch = channels(server.address)
    stub = pb_grpc.KVPackStub(ch)
    for md in (None, bearer("wrong"), [("authorization", "tok-alpha")]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Info(pb.InfoRequest(), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetch(stub, "k", metadata=bearer("nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Health is exempt.
    health = health_pb2_grpc.HealthStub(ch)
    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    info = await stub.Info(pb.InfoRequest(), metadata=bearer("tok-alpha"), timeout=5)
    assert info.auth_required
    data = blob()
    await stub.Put(put_requests(data, "shared-name"), metadata=bearer("tok-alpha"), timeout=5)
    await stub.Put(put_requests(data, "alpha-only"), metadata=bearer("tok-alpha"), timeout=5)
    await stub.Put(put_requests(data, "shared-name"), metadata=bearer("tok-beta"), timeout=5)
    # beta cannot see alpha's key: NOT_FOUND with the same message as a missing key.
    missing, foreign = [], []
    for key, out in (("never-written", missing), ("alpha-only", foreign)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Stat(pb.StatRequest(key=key), metadata=bearer("tok-beta"), timeout=5)
        out.append((err.value.code(), err.value.details().replace(key, "K")))
    assert missing == foreign and missing[0][0] == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Delete(pb.DeleteRequest(key="alpha-only"), metadata=bearer("tok-beta"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.List(pb.ListRequest(), metadata=bearer("tok-beta"), timeout=5)
    assert [e.key for e in listed.entries] == ["shared-name"]
    listed = await stub.List(pb.ListRequest(), metadata=bearer("tok-alpha"), timeout=5)
    assert [e.key for e in listed.entries] == ["alpha-only", "shared-name"]


async def test_tls_and_mtls(start_server: Any, channels: Any, tmp_path: Path) -> None:
    ca = certs.issue("kvpack-test-ca", ca=True)
    srv = certs.issue("localhost", issuer=ca)
    cli = certs.issue("client", issuer=ca)
    files = {}
    for name, content in {
        "ca.pem": certs.pem(ca[0]),
        "server.pem": certs.pem(srv[0]),
        "server.key": certs.pem(srv[0], srv[1]),
    }.items():
        (tmp_path / name).write_bytes(content)
        files[name] = str(tmp_path / name)
    server = await start_server(
        tls_cert=files["server.pem"], tls_key=files["server.key"], tls_client_ca=files["ca.pem"]
    )
    good = grpc.ssl_channel_credentials(
        root_certificates=certs.pem(ca[0]),
        private_key=certs.pem(cli[0], cli[1]),
        certificate_chain=certs.pem(cli[0]),
    )
    stub = pb_grpc.KVPackStub(channels(server.address, good))
    assert (await stub.Info(pb.InfoRequest(), timeout=5)).version
    # Without a client certificate the handshake fails (mTLS requires one).
    anonymous = grpc.ssl_channel_credentials(root_certificates=certs.pem(ca[0]))
    stub = pb_grpc.KVPackStub(channels(server.address, anonymous))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Info(pb.InfoRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
