"""One Compress stream: frames in, answers out, over the engine's pipeline (``kvpack.engine``).

Client messages, in order: ``CompressHeader``; the statistics tensor (SCORES ``[L, B, H, n]`` or
WINDOW_QUERIES ``[L, B, Hq, W, d]``; required when the policy reads scores, optional otherwise);
for each layer ``l = 0..L-1`` its KEYS then VALUES ``[B, Hkv, n, d]``; ``Finish``.

This module is the stream adapter only: the header is checked against this server's limits and
turned into the engine's request (:func:`plan`) before any tensor is received; tensors are
assembled as their chunks arrive, counted against ``--max-request-bytes`` and the server-wide
``--max-buffered-bytes``; each layer goes to the codec pool as soon as its K/V are complete
(what a layer does, and how the budget reaches it, is the engine's: ``engine.Allocation``).
A reader task consumes the client stream and submits per-layer jobs; the handler awaits them in
layer order and streams each layer's answer back while later layers are still uploading. At
most ``ahead`` layers are in flight (backpressure through gRPC flow control), so memory stays
bounded by a few layers plus the encoded container. Deadlines are checked as frames arrive and
before the store; metrics go through a narrow sink and the container through a put callable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, Protocol

import torch
from grpc import aio

from kvpack import codec, wire
from kvpack.engine import STATS_KINDS, Compression, CompressRequest, LayerResult, Layout, StatsKind
from kvpack.errors import InvalidArgument, KVPackError, ResourceExhausted
from kvpack.server import container
from kvpack.server.config import ServerConfig
from kvpack.server.limits import ByteBudget
from kvpack.server.rpc import DRAIN_SECONDS, ChunkWriter, check_deadline, drain
from kvpack.server.stores.base import EntryMeta
from kvpack.v1 import kvpack_pb2 as pb

_DONE = object()
#: What the client stream yields: chunks are decoded by kvpack.wire, everything else by protobuf.
Request = pb.CompressRequest | wire.ChunkFrame


class CompressMetrics(Protocol):
    """What a Compress call reports (``server.metrics.Metrics`` implements it)."""

    def stage(self, stage: str, seconds: float) -> None: ...

    def compressed(self, policy: str, summary: pb.CompressSummary) -> None: ...


@dataclasses.dataclass(frozen=True)
class CompressServices:
    """What a Compress call uses of its server (the servicer builds one per call).

    ``put(key, blob, meta)`` stores a container under the caller's key (namespacing is the
    servicer's); ``buffered`` is the server-wide cap the call's uploaded bytes count against.
    """

    config: ServerConfig
    executor: Executor
    buffered: ByteBudget
    metrics: CompressMetrics
    put: Callable[[str, bytes, EntryMeta], Awaitable[None]]


def plan(header: pb.CompressHeader, config: ServerConfig) -> CompressRequest:
    """Check the header against this server's limits and build the engine's request.

    Everything the header decides is checked here, before any tensor is received or any codec
    work queued: the layout against the limits, then (``CompressRequest.from_header``) the
    budget, every policy and quantisation setting against the layout, the store key, the model
    and the token ids.
    """
    lay = Layout.from_proto(header.layout)
    limits = {
        "num_layers": (config.max_layers, "--max-layers"),
        "batch_size": (config.max_batch_size, "--max-batch-size"),
        "num_kv_heads": (config.max_heads, "--max-heads"),
        "num_query_heads": (config.max_heads, "--max-heads"),
        "head_dim": (config.max_head_dim, "--max-head-dim"),
        "seq_len": (config.max_seq_len, "--max-seq-len"),
    }
    for name, (limit, flag) in limits.items():
        value = getattr(lay, name)
        if value > limit:
            raise ResourceExhausted(f"layout.{name}={value} exceeds this server's {flag}={limit}")
    # The server's own limit first: settings are checked against a cache it would accept.
    raw = 2 * lay.num_layers * lay.layer_bytes
    if raw > config.max_request_bytes:
        raise ResourceExhausted(
            f"the cache is {raw} raw bytes, over this server's --max-request-bytes="
            f"{config.max_request_bytes}"
        )
    return CompressRequest.from_header(header, lay)


class CompressSession:
    """State of one Compress call; :meth:`run` yields the responses."""

    def __init__(self, services: CompressServices, context: aio.ServicerContext) -> None:
        self.services = services
        self.context = context
        self.config = services.config
        self.compression: Compression | None = None  # once the header is planned
        self.received = 0
        self.num_slots = max(2, self.config.workers)  # layers in flight at once
        self.ahead = asyncio.Semaphore(self.num_slots)
        self.jobs: asyncio.Queue[Any] = asyncio.Queue()
        self.abandoned = False  # a layer failed: the reader stops and drains the upload
        # Uploaded bytes held, against --max-buffered-bytes; a layer's share is returned once
        # the layer is encoded, the rest when the call ends.
        self.reservation = services.buffered.reservation()

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.services.executor, fn, *args)

    # -- reading the client stream --------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[Request]) -> None:
        """Consume the client stream, queueing one future per layer, then ``_DONE``."""
        it = aiter(requests)
        try:
            first = await anext(it, None)
            if not isinstance(first, pb.CompressRequest) or first.WhichOneof("msg") != "header":
                raise InvalidArgument("Compress must start with a CompressHeader")
            self.compression = c = Compression(plan(first.header, self.config))
            num_layers = c.request.layout.num_layers
            layer, started = 0, False
            while not self.abandoned:
                msg = await anext(it, None)
                check_deadline(self.context, "Compress upload")
                kind = msg.WhichOneof("msg") if msg is not None else None
                if kind == "finish":
                    if layer != num_layers:
                        raise InvalidArgument(f"Finish after {layer} of {num_layers} layers")
                    break
                if kind != "begin":
                    raise InvalidArgument(
                        "stream ended before Finish"
                        if msg is None
                        else f"expected a TensorBegin or Finish, got {kind}"
                    )
                assert isinstance(msg, pb.CompressRequest)
                begin = msg.begin
                if not started and begin.kind in STATS_KINDS:
                    stats_kind = STATS_KINDS[begin.kind]
                    c.request.layout.check_statistics(
                        stats_kind, begin.shape, wire.dtype_to_torch(begin.dtype)
                    )
                    stats = await self._receive(it, begin, "statistics")
                    await self._start(stats_kind, stats)
                    started = True
                    continue
                if layer >= num_layers:
                    raise InvalidArgument(f"more than layout.num_layers={num_layers} layers")
                if not started:
                    await self._start(None, None)
                    started = True
                k = await self._receive(
                    it, begin, self._check_kv(begin, pb.TENSOR_KIND_KEYS, layer)
                )
                vmsg = await anext(it, None)
                if not isinstance(vmsg, pb.CompressRequest) or vmsg.WhichOneof("msg") != "begin":
                    raise InvalidArgument(f"expected layer {layer}'s VALUES after its KEYS")
                v = await self._receive(
                    it, vmsg.begin, self._check_kv(vmsg.begin, pb.TENSOR_KIND_VALUES, layer)
                )
                await self.ahead.acquire()
                if self.abandoned:
                    break
                loop = asyncio.get_running_loop()
                self.jobs.put_nowait(
                    loop.run_in_executor(self.services.executor, c.layer, layer, k, v)
                )
                layer += 1
            if self.abandoned:
                await drain(it)
            self.jobs.put_nowait(_DONE)
        except asyncio.CancelledError:
            # The cancelled task keeps this frame in its CancelledError's traceback (a cycle
            # through the task): let go of the layer in hand now (see _release).
            k = v = stats = torch.empty(0)
            msg = vmsg = first = None
            raise
        except Exception as exc:  # handed to run(), which raises it in the handler
            if isinstance(exc, KVPackError):
                await drain(it)
            self.jobs.put_nowait(exc)

    async def _start(self, kind: StatsKind | None, stats: torch.Tensor | None) -> None:
        """Fix the allocation (a global selection runs now, on the codec pool)."""
        c = self.compression
        assert c is not None
        try:
            await self._in_pool(c.start, kind, stats)
        finally:
            if "select" in c.timings:
                self.services.metrics.stage("select", c.timings["select"])

    def _check_kv(self, begin: pb.TensorBegin, kind: int, layer: int) -> str:
        assert self.compression is not None
        lay = self.compression.request.layout
        name = "KEYS" if kind == pb.TENSOR_KIND_KEYS else "VALUES"
        if begin.kind != kind or begin.layer != layer:
            raise InvalidArgument(
                f"expected layer {layer}'s {name}, got {pb.TensorKind.Name(begin.kind)} of "
                f"layer {begin.layer} (order: header, statistics, then KEYS and VALUES per layer)"
            )
        if begin.dtype != wire.dtype_from_torch(lay.dtype):
            raise InvalidArgument(
                f"layer {layer} {name} dtype {pb.DType.Name(begin.dtype)} differs from "
                f"layout.dtype {pb.DType.Name(wire.dtype_from_torch(lay.dtype))}"  # type: ignore[arg-type]
            )
        if tuple(begin.shape) != lay.kv_shape:
            raise InvalidArgument(
                f"layer {layer} {name} shape {list(begin.shape)}, expected {list(lay.kv_shape)} "
                "[B, Hkv, n, d] from the layout"
            )
        return name

    async def _receive(
        self, it: AsyncIterator[Request], begin: pb.TensorBegin, what: str
    ) -> torch.Tensor:
        """Assemble one tensor; counts against --max-request-bytes before allocating."""
        left = self.config.max_request_bytes - self.received
        if begin.nbytes > left:
            raise ResourceExhausted(
                f"{what} of {begin.nbytes} bytes would take the request over "
                f"--max-request-bytes={self.config.max_request_bytes}"
            )
        asm: wire.TensorAssembler | None = wire.TensorAssembler(begin, max_bytes=left)
        assert asm is not None
        writer = ChunkWriter(self.services.executor, self.reservation)
        try:
            while not asm.done:
                msg = await anext(it, None)
                if msg is None or msg.WhichOneof("msg") != "chunk":
                    raise InvalidArgument(
                        f"{asm.what}: expected chunks up to {asm.nbytes} bytes, got "
                        f"{'end of stream' if msg is None else msg.WhichOneof('msg')}"
                    )
                await writer.add(asm, msg.chunk)
            await writer.flush()
        except BaseException:
            # This frame outlives the call in the exception's traceback (see _release): it
            # must not keep the half-received tensor alive.
            asm = msg = None
            raise
        self.received += asm.nbytes
        return asm.tensor()

    # -- the response stream ---------------------------------------------------------------------

    async def run(
        self, requests: AsyncIterator[Request]
    ) -> AsyncIterator[pb.CompressResponse | bytes]:
        reader = asyncio.create_task(self._read(requests))
        results: list[LayerResult] = []
        # Budget mode answers the layers after the final check, which may evict further.
        answer_later = False
        failed = False
        raised: BaseException | None = None
        result: LayerResult | None = None
        try:
            while True:
                item = await self.jobs.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                try:
                    result = await item
                finally:
                    self.ahead.release()
                self._observe_layer(result)
                assert self.compression is not None  # a layer ran: the header made it
                request = self.compression.request
                deferred = request.target is not None
                # Budget mode holds the layer's composite cache until its final check: those
                # bytes stay counted against --max-buffered-bytes until the call ends.
                held = result.kept_bytes if deferred else 0
                self.reservation.give_back(result.input_bytes - held)
                answer_later = deferred and request.return_cache
                if request.return_cache and not deferred:
                    for frame in _layer_frames(result):
                        yield frame
                if not answer_later:
                    # Only the encoded layer is needed from here on (budget mode holds its
                    # composite cache itself, for the final check).
                    result.keys = result.values = torch.empty(0)
                results.append(result)
            final = await self._finish(results)
            if answer_later:
                for result in results:
                    for frame in _layer_frames(result):
                        yield frame
            yield final
        except BaseException as exc:
            failed = isinstance(exc, KVPackError)
            raised = exc
            raise
        finally:
            if failed and not reader.done():
                # Let the reader drain the upload so that the client sees our status (see
                # rpc.drain); unblock it if it waits for a layer slot.
                self.abandoned = True
                for _ in range(self.num_slots):
                    self.ahead.release()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), DRAIN_SECONDS + 1)
            if not reader.done():
                reader.cancel()
            # Surface nothing from a cancelled reader; its exception (if any) was queued.
            await asyncio.gather(reader, return_exceptions=True)
            results.clear()
            item = result = None
            self._release(reader, raised)
            raised = None

    def _release(self, reader: asyncio.Task[None], raised: BaseException | None) -> None:
        """Drop everything the call buffered, now rather than at the next garbage collection.

        A failed or cancelled call's exceptions sit in reference cycles (a queued exception's
        traceback holds ``run``'s frame, which holds the exception; a cancelled task's
        CancelledError holds the task's own frame), and their tracebacks hold the finished
        frames of ``_read`` and ``_receive`` with their tensors and half-filled assemblers.
        Clearing those frames and the pipeline's own references frees the buffers at once.
        """
        self.reservation.close()
        _clear_traceback(raised)
        if self.compression is not None:
            self.compression.release()
        while not self.jobs.empty():
            job = self.jobs.get_nowait()
            if isinstance(job, BaseException):
                _clear_traceback(job)
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            _clear_traceback(reader.exception())

    def _observe_layer(self, r: LayerResult) -> None:
        assert self.compression is not None
        self.compression.record(r)
        for stage, seconds in r.timings.items():
            self.services.metrics.stage(stage, seconds)

    async def _finish(self, results: list[LayerResult]) -> pb.CompressResponse:
        c = self.compression
        assert c is not None
        stored = None
        if c.request.store:
            check_deadline(self.context, "Compress store")
            stored = await self._in_pool(c.store, results)
            # The container's sha256 (~2 GB/s; the engine's when it keyed the entry by it) runs
            # in the pool, off the event loop.
            header = codec.read_header(stored.blob)
            meta = await self._in_pool(
                functools.partial(
                    container.meta_from_header, settings=stored.settings, sha256=stored.sha256
                ),
                header,
                stored.blob,
            )
            start = time.perf_counter()
            await self.services.put(stored.key, stored.blob, meta)
            c.timings["store"] = c.timings.get("store", 0.0) + time.perf_counter() - start
        summary = c.summary(results, stored)
        self.services.metrics.compressed(c.request.policy, summary)
        return pb.CompressResponse(summary=summary)


def _clear_traceback(exc: BaseException | None) -> None:
    """Clear the locals of every finished frame in ``exc``'s traceback and its chain (frames
    still executing are left alone by ``traceback.clear_frames``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _layer_frames(r: LayerResult) -> Iterator[bytes]:
    """A layer's composite KEYS, VALUES and INDICES as serialised response messages."""
    for kind, tensor in (
        (pb.TENSOR_KIND_KEYS, r.keys),
        (pb.TENSOR_KIND_VALUES, r.values),
        (pb.TENSOR_KIND_INDICES, r.indices),
    ):
        yield from wire.tensor_frames(pb.CompressResponse, kind, r.layer, tensor)
