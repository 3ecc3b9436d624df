"""Test certificates made with `cryptography`: a CA and leaf certificates it signs.

Leaf certificates name localhost and 127.0.0.1 and allow both server and client use, so one
helper serves TLS, mTLS and the health-check probe tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Pair = tuple[Any, Any]  # (x509.Certificate, private key)


def issue(name: str, issuer: Pair | None = None, *, ca: bool = False) -> Pair:
    """A certificate for common name ``name`` signed by ``issuer`` (self-signed when None)."""
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
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=False
        ).add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(signer_key, hashes.SHA256()), key


def pem(cert: Any, key: Any = None) -> bytes:
    """PEM of ``cert``, or of ``key`` (PKCS#8, unencrypted) when given."""
    if key is not None:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def write(directory: Path, name: str, pair: Pair) -> tuple[Path, Path]:
    """Writes ``{name}.pem`` and ``{name}.key`` under ``directory``; returns their paths."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(pem(pair[0]))
    key_path.write_bytes(pem(*pair))
    return cert_path, key_path
