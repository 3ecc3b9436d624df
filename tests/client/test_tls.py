"""TLS and mTLS between KVPackClient and a real server, certificates made with `cryptography`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvpack import errors
from kvpack.client import TLS, KVPackClient
from tests import certs


def test_mtls(start_server: Any, tmp_path: Path) -> None:
    ca = certs.issue("ca", ca=True)
    certs.write(tmp_path, "ca", ca)
    certs.write(tmp_path, "server", certs.issue("server", ca))
    certs.write(tmp_path, "client", certs.issue("client", ca))
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
