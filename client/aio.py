"""asyncio gRPC client of a kvpack server (same methods as :class:`kvpack.client.KVPackClient`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar, Unpack

import grpc
import torch
from grpc import aio

from kvpack import codec
from kvpack.client import messages
from kvpack.client.api import CompressOptions, Layers, Tensors
from kvpack.client.channel import CallPolicy, TLSArg, auth_metadata, channel_credentials, retryable
from kvpack.client.result import CompressResult, EntryInfo, ServerInfo
from kvpack.errors import DataLoss, DeadlineExceeded, from_rpc_error
from kvpack.options import channel_options
from kvpack.v1 import kvpack_pb2 as pb
from kvpack.v1 import kvpack_pb2_grpc

T = TypeVar("T")
M = TypeVar("M")


async def _off_loop(messages_: Iterator[M]) -> AsyncIterator[M]:
    """Yields ``messages_`` produced in a worker thread: building them copies tensors to host
    memory and checksums them, which must not stall the event loop."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, messages_, done)
        if item is done:
            return
        yield item  # type: ignore[misc]


class AsyncKVPackClient:
    """asyncio client; arguments, results and errors as :class:`kvpack.client.KVPackClient`.

    Safe for many concurrent calls on one event loop (one channel, HTTP/2 streams).
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
            self._channel = aio.insecure_channel(target, options=options)
        else:
            self._channel = aio.secure_channel(target, credentials, options=options)
        self._stub = kvpack_pb2_grpc.KVPackStub(self._channel)
        self._compress = messages.compress_method(self._channel)
        self._fetch = messages.fetch_method(self._channel)
        self._metadata = auth_metadata(token)
        self.policy = CallPolicy(timeout=timeout, timeout_per_mib=timeout_per_mib, retries=retries)

    async def _once(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    async def _retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        sleeps = self.policy.sleeps()
        while True:
            try:
                return await fn()
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                delay = next(sleeps, None) if retryable(err) else None
                if delay is None:
                    raise err from e
            await asyncio.sleep(delay)

    async def compress(
        self,
        keys: Tensors,
        values: Tensors,
        *,
        progress: messages.Progress = None,
        **options: Unpack[CompressOptions],
    ) -> CompressResult:
        """See :meth:`kvpack.client.KVPackClient.compress`. Never retried."""
        upload = messages.compress_upload(keys, values, options)
        answer = messages.CompressAnswer(
            len(upload.keys), messages.answer_limit(upload), upload.device
        )

        async def run() -> CompressResult:
            deadline = self.policy.deadline(2 * upload.nbytes)
            call = self._compress(
                _off_loop(upload.frames(progress)),
                timeout=deadline,
                metadata=self._metadata,
            )
            try:
                async for response in call:
                    answer.add(response)
            except grpc.RpcError as e:
                call.cancel()
                left = call.time_remaining()
                if e.code() == grpc.StatusCode.INTERNAL and left is not None and left <= 0:
                    # grpc.aio reports a deadline that expires while the request stream is still
                    # being written as INTERNAL "Internal error from Core" (the sync client says
                    # DEADLINE_EXCEEDED): report what happened.
                    raise DeadlineExceeded(
                        f"Compress deadline of {deadline:.1f} s exceeded during the upload"
                    ) from e
                raise
            except BaseException:
                call.cancel()
                raise
            return answer.result(upload.header.return_cache)

        return await self._once(run)

    async def fetch_bytes(
        self,
        key: str,
        layers: Layers = None,
        *,
        progress: messages.Progress = None,
    ) -> bytes:
        """See :meth:`kvpack.client.KVPackClient.fetch_bytes`."""
        size = (await self.stat(key)).stored_bytes
        request = messages.fetch_request(key, layers)

        async def run() -> bytes:
            assembler = None
            call = self._fetch(request, timeout=self.policy.deadline(size), metadata=self._metadata)
            async for response in call:
                if assembler is None:
                    assembler = messages.blob_assembler(response, max(size, 1))
                messages.add_fetched(assembler, response, progress)
            if assembler is None:
                raise DataLoss(f"Fetch of {key!r} returned nothing")
            return bytes(assembler.result())

        return await self._retrying(run)

    async def fetch(
        self,
        key: str,
        layers: Layers = None,
        *,
        device: torch.device | str | None = None,
        progress: messages.Progress = None,
    ) -> codec.DecodedCache:
        """Fetch and decode (in a worker thread): ``kvpack.codec.DecodedCache``."""
        blob = await self.fetch_bytes(key, layers, progress=progress)
        return await asyncio.to_thread(
            codec.decode, blob, device=device, threads=messages.DECODE_THREADS
        )

    async def put(self, blob: bytes, key: str | None = None) -> str:
        """See :meth:`kvpack.client.KVPackClient.put`."""
        deadline = self.policy.deadline(len(blob))

        async def run() -> str:
            response = await self._stub.Put(
                _off_loop(messages.put_requests(blob, key)),
                timeout=deadline,
                metadata=self._metadata,
            )
            return str(response.key)

        return await (self._retrying(run) if key else self._once(run))

    async def delete(self, key: str) -> None:
        async def run() -> pb.DeleteResponse:
            return await self._stub.Delete(
                pb.DeleteRequest(key=key), timeout=self.policy.deadline(), metadata=self._metadata
            )

        await self._retrying(run)

    async def stat(self, key: str) -> EntryInfo:
        async def run() -> pb.EntryInfo:
            return await self._stub.Stat(
                pb.StatRequest(key=key), timeout=self.policy.deadline(), metadata=self._metadata
            )

        return messages.entry_info(await self._retrying(run))

    async def list(self, prefix: str = "", *, page_size: int = 0) -> AsyncIterator[EntryInfo]:
        """Entries whose key starts with ``prefix`` (``async for``), fetching pages as needed."""
        token = ""
        while True:
            request = pb.ListRequest(prefix=prefix, page_size=page_size, page_token=token)

            async def run(request: pb.ListRequest = request) -> pb.ListResponse:
                return await self._stub.List(
                    request, timeout=self.policy.deadline(), metadata=self._metadata
                )

            page = await self._retrying(run)
            for entry in page.entries:
                yield messages.entry_info(entry)
            token = page.next_page_token
            if not token:
                return

    async def info(self) -> ServerInfo:
        async def run() -> pb.InfoResponse:
            return await self._stub.Info(
                pb.InfoRequest(), timeout=self.policy.deadline(), metadata=self._metadata
            )

        return messages.server_info(await self._retrying(run))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncKVPackClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
