"""TLS and mTLS between KVPackClient and a real server, certificates made with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from kvpack import errors
from kvpack.client import TLS, KVPackClient

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _issue(
    directory: Path, name: str, issuer: tuple[Any, Any] | None, *, ca: bool = False
) -> tuple[Any, Any]:
    """Writes ``{name}.pem`` / ``{name}.key``; self-signed when ``issuer`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
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
    cert = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


def test_mtls(start_server: Any, tmp_path: Path) -> None:
    ca = _issue(tmp_path, "ca", None, ca=True)
    _issue(tmp_path, "server", ca)
    _issue(tmp_path, "client", ca)
    secured = start_server(
        tls_cert=str(tmp_path / "server.pem"),
        tls_key=str(tmp_path / "server.key"),
        tls_client_ca=str(tmp_path / "ca.pem"),
    )
    mutual = TLS(
        root_ca=tmp_path / "ca.pem", cert=tmp_path / "client.pem", key=tmp_path / "client.key"
    )
    with KVPackClient(secured.address, tls=mutual) as client:
        assert client.info().store == "memory"
    # Without a client certificate the handshake fails: no call gets through.
    no_cert = KVPackClient(secured.address, tls=TLS(root_ca=tmp_path / "ca.pem"), retries=0)
    with no_cert, pytest.raises(errors.Unavailable):
        no_cert.info()
    # A plaintext client cannot talk to a TLS server either.
    plain = KVPackClient(secured.address, retries=0)
    with plain, pytest.raises(errors.Unavailable):
        plain.info()
