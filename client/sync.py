"""Blocking gRPC client of a kvpack server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar, Unpack

import grpc
import torch

from kvpack import codec
from kvpack.client import messages
from kvpack.client.api import CompressOptions, Layers, Tensors
from kvpack.client.channel import CallPolicy, TLSArg, auth_metadata, channel_credentials, retryable
from kvpack.client.result import CompressResult, EntryInfo, ServerInfo
from kvpack.errors import DataLoss, from_rpc_error
from kvpack.options import channel_options
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc

T = TypeVar("T")

#: Bound on a fetched container when its size is not known from Stat (sanity, not a quota).
MAX_FETCH_BYTES = 1 << 36


class KVPackClient:
    """Client of a kvpack server (thread-safe; one channel).

    Args:
        target: ``host:port`` (any gRPC target string).
        token: bearer token sent as ``authorization`` metadata.
        tls: None/False plaintext, True system roots, :class:`kvpack.client.TLS` (paths: root CA,
            client cert/key for mTLS) or ready ``grpc.ChannelCredentials``.
        timeout, timeout_per_mib: deadline of a call = timeout + timeout_per_mib * MiB moved.
        retries: retries of idempotent calls (fetch, stat, list, info, delete, put with a key)
            on UNAVAILABLE, with exponential backoff and jitter. Compress is never retried.

    Errors are :mod:`kvpack.errors` exceptions carrying the server's message.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TLSArg = None,
        timeout: float = 30.0,
        timeout_per_mib: float = 0.5,
        retries: int = 3,
    ) -> None:
        credentials, extra = channel_credentials(tls)
        options = [*channel_options(), *extra]
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = kvpack_pb2_grpc.KVPackStub(self._channel)
        self._compress = messages.compress_method(self._channel)
        self._fetch = messages.fetch_method(self._channel)
        self._metadata = auth_metadata(token)
        self.policy = CallPolicy(timeout=timeout, timeout_per_mib=timeout_per_mib, retries=retries)

    # -- plumbing ---------------------------------------------------------------------------

    def _once(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _retrying(self, fn: Callable[[], T]) -> T:
        sleeps = self.policy.sleeps()
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                delay = next(sleeps, None) if retryable(err) else None
                if delay is None:
                    raise err from e
            time.sleep(delay)

    # -- calls ------------------------------------------------------------------------------

    def compress(
        self,
        keys: Tensors,
        values: Tensors,
        *,
        progress: messages.Progress = None,
        **options: Unpack[CompressOptions],
    ) -> CompressResult:
        """Compress a prefilled cache; store its encoding and/or return the composite cache.

        Args:
            keys, values: per-layer ``[B, Hkv, n, d]`` (or stacked ``[L, B, Hkv, n, d]``).
            progress: called with the bytes of each tensor as it is uploaded.
            options: :class:`~kvpack.client.api.CompressOptions`: the statistics (``scores``
                or ``window_queries``), ``policy`` with ``ratio`` or ``n_keep`` and
                ``policy_settings``, ``quant``, ``store``, ``key``, ``model``, ``token_ids``,
                ``return_cache`` (the composite K/V and kept indices come back on ``keys``'
                device); or, instead of ``ratio`` / ``n_keep`` and the error bounds, a byte
                budget: ``target_ratio`` and/or ``target_bytes`` with an optional floor
                ``max_ratio`` / ``max_error_bound`` (the choice comes back in
                ``CompressResult.budget``).

        The upload streams while the server answers layer by layer. Never retried: a failed
        call stores nothing.
        """
        upload = messages.compress_upload(keys, values, options)
        answer = messages.CompressAnswer(
            len(upload.keys), messages.answer_limit(upload), upload.device
        )

        def run() -> CompressResult:
            call = self._compress(
                upload.frames(progress),
                timeout=self.policy.deadline(2 * upload.nbytes),
                metadata=self._metadata,
            )
            try:
                for response in call:
                    answer.add(response)
            except BaseException:
                call.cancel()
                raise
            return answer.result(upload.header.return_cache)

        return self._once(run)

    def fetch_bytes(
        self,
        key: str,
        layers: Layers = None,
        *,
        progress: messages.Progress = None,
    ) -> bytes:
        """The stored container (whole, or restricted to a half-open layer range)."""
        size = self.stat(key).stored_bytes
        request = messages.fetch_request(key, layers)

        def run() -> bytes:
            assembler = None
            for response in self._fetch(
                request, timeout=self.policy.deadline(size), metadata=self._metadata
            ):
                if assembler is None:
                    assembler = messages.blob_assembler(response, max(size, 1))
                messages.add_fetched(assembler, response, progress)
            if assembler is None:
                raise DataLoss(f"Fetch of {key!r} returned nothing")
            return bytes(assembler.result())

        return self._retrying(run)

    def fetch(
        self,
        key: str,
        layers: Layers = None,
        *,
        device: torch.device | str | None = None,
        progress: messages.Progress = None,
    ) -> codec.DecodedCache:
        """Fetch and decode locally: ``kvpack.codec.DecodedCache`` (keys, values, indices,
        layers, header) with tensors on ``device`` (default CPU)."""
        blob = self.fetch_bytes(key, layers, progress=progress)
        return codec.decode(blob, device=device, threads=messages.DECODE_THREADS)

    def put(self, blob: bytes, key: str | None = None) -> str:
        """Store an encoded container; returns its key (content-derived when ``key`` is None).
        Retried on UNAVAILABLE only with an explicit key (a retry cannot store twice)."""
        deadline = self.policy.deadline(len(blob))

        def run() -> str:
            response = self._stub.Put(
                messages.put_requests(blob, key), timeout=deadline, metadata=self._metadata
            )
            return str(response.key)

        return self._retrying(run) if key else self._once(run)

    def delete(self, key: str) -> None:
        """Remove an entry (NotFound if there is none)."""
        self._retrying(
            lambda: self._stub.Delete(
                pb.DeleteRequest(key=key), timeout=self.policy.deadline(), metadata=self._metadata
            )
        )

    def stat(self, key: str) -> EntryInfo:
        """Metadata of one entry (NotFound if there is none)."""
        msg = self._retrying(
            lambda: self._stub.Stat(
                pb.StatRequest(key=key), timeout=self.policy.deadline(), metadata=self._metadata
            )
        )
        return messages.entry_info(msg)

    def list(self, prefix: str = "", *, page_size: int = 0) -> Iterator[EntryInfo]:
        """Entries whose key starts with ``prefix``, in key order, fetching pages as needed."""
        token = ""
        while True:
            request = pb.ListRequest(prefix=prefix, page_size=page_size, page_token=token)

            def run(request: pb.ListRequest = request) -> pb.ListResponse:
                return self._stub.List(
                    request, timeout=self.policy.deadline(), metadata=self._metadata
                )

            page = self._retrying(run)
            for entry in page.entries:
                yield messages.entry_info(entry)
            token = page.next_page_token
            if not token:
                return

    def info(self) -> ServerInfo:
        """Server version, policies, codecs, store and limits."""
        msg = self._retrying(
            lambda: self._stub.Info(
                pb.InfoRequest(), timeout=self.policy.deadline(), metadata=self._metadata
            )
        )
        return messages.server_info(msg)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KVPackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
