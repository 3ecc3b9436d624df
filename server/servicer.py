"""The KVPack gRPC servicer: thin handlers over the store, the codec and Compress sessions.

Every handler is wrapped by :mod:`kvpack.server.rpc` (errors -> status, metrics, stream limits).
Keys are validated and put in the caller's tenant namespace here; another tenant's key answers
NOT_FOUND exactly like a missing one, and the message never names the namespace.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc import aio

from kvpack import __version__, codec, wire
from kvpack.engine import POLICY_NAMES
from kvpack.errors import InvalidArgument, KVPackError, NotFound
from kvpack.server import container, convert, keys
from kvpack.server.auth import Authenticator
from kvpack.server.compress import CompressServices, CompressSession
from kvpack.server.config import ServerConfig
from kvpack.server.limits import ByteBudget, IdleLimit, Reservation, StreamLimiter
from kvpack.server.metrics import Metrics
from kvpack.server.rpc import ChunkWriter, check_deadline, drain, streaming, unary
from kvpack.server.stores.base import Store
from kvpack.v1 import kvpack_pb2 as pb

T = TypeVar("T")
LIST_PAGE_DEFAULT = 100
LIST_PAGE_MAX = 1000


class KVPackServicer:
    """Handlers for kvpack.v1.KVPack (registered by :func:`add_to_server`). ``executor`` runs all
    CPU-heavy codec work."""

    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        auth: Authenticator,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.config = config
        self.store = store
        self.auth = auth
        self.metrics = metrics
        self.executor = executor
        self.streams = StreamLimiter(config.max_concurrent_streams, config.max_streams_per_tenant)
        self.buffered = ByteBudget(config.max_buffered_bytes)

    # -- helpers -------------------------------------------------------------------------------

    def tenant(self, context: aio.ServicerContext) -> str:
        """The caller's namespace (the interceptor already rejected bad tokens)."""
        tenant = self.auth.tenant(context.invocation_metadata())
        if tenant is None:  # pragma: no cover - the interceptor answers first
            raise InvalidArgument("unauthenticated")
        return tenant

    def store_key(self, context: aio.ServicerContext, key: str) -> str:
        return keys.namespaced(self.tenant(context), keys.validate_key(key))

    async def in_executor(self, stage: str, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the codec pool, timing it as ``stage``."""
        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.metrics.stage_duration.labels(stage).observe(time.perf_counter() - start)

    async def refresh_store_gauges(self) -> None:
        """Update the store gauges from the store's own accounting."""
        usage = await self.store.usage()
        name = self.store.name
        self.metrics.store_bytes.labels(name).set(usage.bytes)
        self.metrics.store_entries.labels(name).set(usage.entries)
        self.metrics.store_budget_bytes.labels(name).set(usage.budget)

    # -- RPCs ----------------------------------------------------------------------------------

    @streaming("Compress")
    async def Compress(
        self,
        request_iterator: AsyncIterator[pb.CompressRequest | wire.ChunkFrame],
        context: aio.ServicerContext,
    ) -> AsyncIterator[pb.CompressResponse | bytes]:
        tenant = self.tenant(context)

        async def put(key: str, blob: bytes, meta: Any) -> None:
            await self.put_entry(keys.namespaced(tenant, key), blob, meta)

        services = CompressServices(self.config, self.executor, self.buffered, self.metrics, put)
        session = CompressSession(services, context)
        requests = IdleLimit(request_iterator, self.config.idle_timeout, "Compress upload")
        async for response in session.run(requests):
            yield response

    @streaming("Fetch")
    async def Fetch(
        self, request: pb.FetchRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.FetchResponse | bytes]:
        key = self.store_key(context, request.key)
        entry = await self._get(key, request.key)
        start = time.perf_counter()
        blob = entry.data
        if request.layer_start or request.layer_end:
            blob = await asyncio.get_running_loop().run_in_executor(
                self.executor, container.slice_stored, blob, request.layer_start, request.layer_end
            )
        total = len(blob)
        # Frames serialised here straight from the blob: one copy per chunk (see kvpack.wire).
        prefix = pb.FetchResponse(total_bytes=total).SerializeToString()
        for frame in wire.blob_frames(pb.FetchResponse, blob, prefix):
            check_deadline(context, "Fetch")
            yield frame
        if total == 0:
            yield pb.FetchResponse(total_bytes=0)
        self.metrics.fetch_bytes.inc(total)
        self.metrics.stage_duration.labels("fetch").observe(time.perf_counter() - start)

    @unary("Put", stream=True)
    async def Put(
        self,
        request_iterator: AsyncIterator[pb.PutRequest | wire.ChunkFrame],
        context: aio.ServicerContext,
    ) -> pb.PutResponse:
        tenant = self.tenant(context)
        requests = IdleLimit(request_iterator, self.config.idle_timeout, "Put upload")
        reservation = self.buffered.reservation()
        try:
            return await self._put(tenant, requests, reservation, context)
        finally:
            reservation.close()

    async def _put(
        self,
        tenant: str,
        requests: IdleLimit,
        reservation: Reservation,
        context: aio.ServicerContext,
    ) -> pb.PutResponse:
        try:
            blob, header = await self._receive_put(requests, reservation, context)
        except KVPackError:
            await drain(requests)
            raise
        # Verify, and hash once (sha256 runs at ~2 GB/s), off the event loop.
        meta = await self.in_executor("decode", container.verified_meta, blob)
        key = header.key or keys.CONTENT_KEY_PREFIX + meta.sha256  # = engine.keys.blob_key(blob)
        await self.put_entry(keys.namespaced(tenant, key), blob, meta)
        return pb.PutResponse(key=key, stored_bytes=len(blob))

    async def _receive_put(
        self,
        requests: AsyncIterator[pb.PutRequest | wire.ChunkFrame],
        reservation: Reservation,
        context: aio.ServicerContext,
    ) -> tuple[bytes, pb.PutHeader]:
        """The uploaded container (size bounded, CRC checked) and its header."""
        first = await anext(requests, None)
        if not isinstance(first, pb.PutRequest) or first.WhichOneof("msg") != "header":
            raise InvalidArgument("Put must start with a PutHeader")
        header = first.header
        if header.key:
            keys.validate_key(header.key)
        assembler = wire.BytesAssembler(
            header.total_bytes,
            max_bytes=self.config.max_request_bytes,
            crc32=header.crc32,
            what="Put container",
        )
        writer = ChunkWriter(self.executor, reservation)
        async for message in requests:
            if message.WhichOneof("msg") != "chunk":
                raise InvalidArgument("Put expects only chunks after its header")
            await writer.add(assembler, message.chunk)
            check_deadline(context, "Put upload")
        await writer.flush()
        return bytes(assembler.result()), header

    @unary("Delete")
    async def Delete(
        self, request: pb.DeleteRequest, context: aio.ServicerContext
    ) -> pb.DeleteResponse:
        key = self.store_key(context, request.key)
        if not await self.store.delete(key):
            raise NotFound(f"no entry {request.key!r}")
        if self.store.usage_is_cheap:
            await self.refresh_store_gauges()
        return pb.DeleteResponse(key=request.key)

    @unary("Stat")
    async def Stat(self, request: pb.StatRequest, context: aio.ServicerContext) -> pb.EntryInfo:
        key = self.store_key(context, request.key)
        try:
            meta = await self.store.stat(key)
        except NotFound:
            raise NotFound(f"no entry {request.key!r}") from None
        return convert.entry_info(request.key, meta)

    @unary("List")
    async def List(self, request: pb.ListRequest, context: aio.ServicerContext) -> pb.ListResponse:
        keys.validate_prefix(request.prefix)
        ns = keys.tenant_prefix(self.tenant(context))
        size = min(request.page_size or LIST_PAGE_DEFAULT, LIST_PAGE_MAX)
        after = _decode_page_token(request.page_token)
        # One more than the page tells whether another page follows; the store's cost is the
        # page's, not the tenant's (or the whole store's) entry count.
        start = ns + after if after else ""
        found = await self.store.list_page(ns + request.prefix, start, size + 1)
        items = [(k[len(ns) :], meta) for k, meta in found]
        page = items[:size]
        response = pb.ListResponse(entries=[convert.entry_info(k, m) for k, m in page])
        if len(items) > size:
            response.next_page_token = _encode_page_token(page[-1][0])
        return response

    @unary("Info")
    async def Info(self, request: pb.InfoRequest, context: aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(
            version=__version__,
            policies=list(POLICY_NAMES),
            quant_modes=list(codec.MODES),
            entropy_coders=list(codec.ENTROPY_CODERS),
            container_version=codec.CONTAINER_VERSION,
            store=self.store.name,
            limits=convert.limits(self.config),
            auth_required=self.auth.required,
        )

    # -- store access with NOT_FOUND messages that never show the namespace ---------------------

    async def _get(self, key: str, shown: str) -> Any:
        start = time.perf_counter()
        try:
            return await self.store.get(key)
        except NotFound:
            raise NotFound(f"no entry {shown!r}") from None
        finally:
            self.metrics.stage_duration.labels("store").observe(time.perf_counter() - start)

    async def put_entry(self, key: str, blob: bytes, meta: Any) -> None:
        """Store ``blob`` under the namespaced ``key``, timing it as the "store" stage."""
        start = time.perf_counter()
        try:
            await self.store.put(key, blob, meta)
        finally:
            self.metrics.stage_duration.labels("store").observe(time.perf_counter() - start)
        if self.store.usage_is_cheap:
            await self.refresh_store_gauges()


def _encode_page_token(last_key: str) -> str:
    return base64.urlsafe_b64encode(last_key.encode()).decode()


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("invalid page_token") from None


def add_to_server(servicer: KVPackServicer, server: aio.Server) -> None:
    """``add_KVPackServicer_to_server`` with the chunk-carrying messages of Compress, Fetch and
    Put (de)serialised by :mod:`kvpack.wire` (same bytes on the wire, fewer copies)."""
    handlers = {
        "Compress": grpc.stream_stream_rpc_method_handler(
            servicer.Compress,
            request_deserializer=wire.frame_parser(pb.CompressRequest),
            response_serializer=wire.serialize,
        ),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            servicer.Fetch,
            request_deserializer=pb.FetchRequest.FromString,
            response_serializer=wire.serialize,
        ),
        "Put": grpc.stream_unary_rpc_method_handler(
            servicer.Put,
            request_deserializer=wire.frame_parser(pb.PutRequest),
            response_serializer=pb.PutResponse.SerializeToString,
        ),
    }
    for name, request, response in (
        ("Delete", pb.DeleteRequest, pb.DeleteResponse),
        ("Stat", pb.StatRequest, pb.EntryInfo),
        ("List", pb.ListRequest, pb.ListResponse),
        ("Info", pb.InfoRequest, pb.InfoResponse),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    service = pb.DESCRIPTOR.services_by_name["KVPack"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
