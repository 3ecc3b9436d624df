"""Bearer tokens, tenant namespaces, TLS and mTLS."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpack import codec
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc as pb_grpc
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


def _cert(name: str, issuer: Any = None, ca: bool = False) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_cert, signer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(signer_key, hashes.SHA256()), key


def _pem(cert: Any, key: Any = None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if key is not None:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return cert.public_bytes(serialization.Encoding.PEM)


async def test_tls_and_mtls(start_server: Any, channels: Any, tmp_path: Path) -> None:
    ca = _cert("kvpack-test-ca", ca=True)
    srv = _cert("localhost", issuer=ca)
    cli = _cert("client", issuer=ca)
    files = {}
    for name, content in {
        "ca.pem": _pem(ca[0]),
        "server.pem": _pem(srv[0]),
        "server.key": _pem(srv[0], srv[1]),
    }.items():
        (tmp_path / name).write_bytes(content)
        files[name] = str(tmp_path / name)
    server = await start_server(
        tls_cert=files["server.pem"], tls_key=files["server.key"], tls_client_ca=files["ca.pem"]
    )
    good = grpc.ssl_channel_credentials(
        root_certificates=_pem(ca[0]),
        private_key=_pem(cli[0], cli[1]),
        certificate_chain=_pem(cli[0]),
    )
    stub = pb_grpc.KVPackStub(channels(server.address, good))
    assert (await stub.Info(pb.InfoRequest(), timeout=5)).version
    # Without a client certificate the handshake fails (mTLS requires one).
    anonymous = grpc.ssl_channel_credentials(root_certificates=_pem(ca[0]))
    stub = pb_grpc.KVPackStub(channels(server.address, anonymous))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Info(pb.InfoRequest(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
