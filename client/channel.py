"""Channel credentials, bearer-token metadata, deadlines and retry policy of the clients."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TypeAlias

import grpc

from kvpack.errors import KVPackError, Unavailable

MiB = 1 << 20


@dataclass(frozen=True)
class TLS:
    """TLS settings by file path: ``root_ca`` verifies the server (None: system roots);
    ``cert`` + ``key`` present a client certificate (mTLS); ``server_name`` overrides the name
    checked against the server's certificate (e.g. when dialling an IP)."""

    root_ca: str | PathLike[str] | None = None
    cert: str | PathLike[str] | None = None
    key: str | PathLike[str] | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("mTLS needs both cert and key")

        def read(path: str | PathLike[str] | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )


TLSArg: TypeAlias = TLS | grpc.ChannelCredentials | bool | None


def channel_credentials(
    tls: TLSArg,
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """``(credentials or None for plaintext, extra channel options)`` for ``tls``:
    None/False plaintext, True system roots, a :class:`TLS` or ready ``ChannelCredentials``."""
    if tls is None or tls is False:
        return None, []
    if tls is True:
        return grpc.ssl_channel_credentials(), []
    if isinstance(tls, TLS):
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        return tls.credentials(), options
    return tls, []


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata; a bearer token rides here (call credentials would demand TLS, and
    loopback/sidecar deployments run plaintext)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class CallPolicy:
    """Deadlines scaled to bytes and retries of idempotent calls.

    Attributes:
        timeout: seconds every call gets regardless of size.
        timeout_per_mib: extra seconds per MiB the call moves (upload or download).
        retries: retries after the first attempt of an idempotent call on UNAVAILABLE.
        backoff: first backoff in seconds; doubles per retry up to ``max_backoff``; each sleep
            is drawn uniformly from [0, backoff] ("full jitter") so clients do not retry in step.
    """

    timeout: float = 30.0
    timeout_per_mib: float = 0.5
    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0

    def deadline(self, nbytes: int = 0) -> float:
        """Seconds allowed for a call moving ``nbytes``."""
        return self.timeout + self.timeout_per_mib * nbytes / MiB

    def sleeps(self) -> Iterator[float]:
        """Backoff before each retry (``retries`` values)."""
        for attempt in range(self.retries):
            yield random.uniform(0.0, min(self.max_backoff, self.backoff * 2**attempt))


def retryable(exc: KVPackError) -> bool:
    """Only UNAVAILABLE is safe to retry: the call did not reach (or was not accepted by) the
    server; other codes would fail again or hide a real error."""
    return isinstance(exc, Unavailable)
