"""One wrapper around every RPC handler: error mapping, metrics, stream limits, deadlines.

Handlers raise :mod:`kvpack.errors` exceptions; this module is the single place that turns them
into ``context.abort(code, message)``, counts ``kvpack_requests_total{method,code}``, observes
``kvpack_request_duration_seconds`` and tracks ``kvpack_inflight_streams``. Unexpected exceptions
are logged with a traceback and answered INTERNAL without leaking internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

import grpc
from grpc import aio

from kvpack import wire
from kvpack.errors import DeadlineExceeded, KVPackError
from kvpack.server.limits import Reservation, StreamLimiter
from kvpack.server.metrics import Metrics

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Host(Protocol):
    """What the wrapper needs from the servicer."""

    metrics: Metrics
    streams: StreamLimiter

    def tenant(self, context: aio.ServicerContext) -> str: ...


#: After rejecting a client-streaming call, read and discard at most this much of the rest of
#: the upload before answering. grpc.aio clients that are still writing when the status arrives
#: otherwise report INTERNAL "Internal error from Core" instead of our status (grpc/grpc#36066).
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 2.0


async def drain(
    requests: AsyncIterator[Any], max_bytes: int = DRAIN_BYTES, seconds: float = DRAIN_SECONDS
) -> None:
    """Discard the rest of a client stream, within ``max_bytes`` / ``seconds``."""
    seen = 0

    async def consume() -> None:
        nonlocal seen
        async for message in requests:
            seen += message.ByteSize()
            if seen > max_bytes:
                return

    with contextlib.suppress(Exception):  # timeout, or the stream itself failed: stop draining
        await asyncio.wait_for(consume(), seconds)


class ChunkWriter:
    """Feeds received chunks to an assembler with the copy and CRC (about 1 ms per MiB) on
    ``executor`` instead of the event loop: one write at a time, in order, each overlapping the
    arrival of the next chunk. Offsets and sizes are checked on the loop, before anything is
    copied, and every chunk is counted in the call's ``reservation`` of the server's buffered
    bytes; :meth:`flush` before taking the result."""

    def __init__(self, executor: Executor, reservation: Reservation) -> None:
        self.executor = executor
        self.reservation = reservation
        self._pending: asyncio.Future[None] | None = None

    async def add(self, assembler: wire.BytesAssembler | wire.TensorAssembler, chunk: Any) -> None:
        start = assembler.received
        data = assembler.claim(chunk)
        # Counted against --max-buffered-bytes as it arrives, never as announced.
        self.reservation.take(len(data), assembler.what)
        await self.flush()
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(self.executor, assembler.write, start, data)

    async def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending


def check_deadline(context: aio.ServicerContext, what: str) -> None:
    """Raise DeadlineExceeded if the call's deadline has passed (checked between stages)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded(f"deadline exceeded during {what}")


def _call_is_over(context: aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return bool(context.cancelled()) or (remaining is not None and remaining <= 0)


def _code_of_cancel(context: aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    return grpc.StatusCode.CANCELLED.name


class _Call:
    """Bookkeeping of one call: inflight gauge, stream slot, final code and duration."""

    def __init__(self, host: Host, method: str, stream: bool) -> None:
        self.host, self.method, self.stream = host, method, stream
        self.code = grpc.StatusCode.OK.name
        self.start = time.perf_counter()
        self.slot_of: str | None = None  # the tenant whose stream slot this call holds

    def begin(self, context: aio.ServicerContext) -> None:
        """Take a stream slot of the caller's tenant (RESOURCE_EXHAUSTED when none is free) and
        count the call."""
        self.host.metrics.inflight_streams.labels(self.method).inc()
        if self.stream:
            tenant = self.host.tenant(context)
            self.host.streams.acquire(tenant)
            self.slot_of = tenant

    def end(self) -> None:
        self.host.metrics.inflight_streams.labels(self.method).dec()
        if self.slot_of is not None:
            self.host.streams.release(self.slot_of)
        self.host.metrics.requests.labels(self.method, self.code).inc()
        self.host.metrics.request_duration.labels(self.method).observe(
            time.perf_counter() - self.start
        )

    async def fail(self, context: aio.ServicerContext, exc: BaseException) -> None:
        """Record the status for ``exc`` and raise it to gRPC (never returns normally)."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            self.code = _code_of_cancel(context)
            raise exc
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or _is_abort(exc):
            raise exc
        if _call_is_over(context):
            # The client is gone or the deadline passed; whatever we raise next (e.g. an
            # incomplete upload) is a consequence, not the cause. End the call through abort:
            # re-raised, grpc would log it as an unexpected servicer error with a traceback
            # (error-log noise for every client timeout, and the traceback keeps the handler's
            # frames, the whole session, alive as long as the log record).
            self.code = _code_of_cancel(context)
            await context.abort(grpc.StatusCode[self.code], f"{self.method}: {self.code}")
        if isinstance(exc, KVPackError):
            err = exc
        else:
            log.exception("%s failed unexpectedly", self.method)
            err = KVPackError(f"internal error in {self.method} ({type(exc).__name__})")
        self.code = err.code.name
        await context.abort(err.code, err.message)


def unary(
    method: str, *, stream: bool = False
) -> Callable[
    [Callable[[Any, Any, aio.ServicerContext], Awaitable[Resp]]],
    Callable[[Any, Any, aio.ServicerContext], Awaitable[Resp]],
]:
    """Wrap a handler returning one response (unary or client-streaming when ``stream``)."""

    def wrap(
        fn: Callable[[Any, Any, aio.ServicerContext], Awaitable[Resp]],
    ) -> Callable[[Any, Any, aio.ServicerContext], Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(self: Host, request: Any, context: aio.ServicerContext) -> Resp:
            call = _Call(self, method, stream)
            try:
                call.begin(context)
                return await fn(self, request, context)
            except BaseException as exc:
                await call.fail(context, exc)
                raise  # pragma: no cover - fail() always raises
            finally:
                call.end()

        return handler

    return wrap


def streaming(
    method: str,
) -> Callable[
    [Callable[[Any, Any, aio.ServicerContext], AsyncIterator[Resp]]],
    Callable[[Any, Any, aio.ServicerContext], AsyncIterator[Resp]],
]:
    """Wrap a handler that yields responses (server- or bidi-streaming); always takes a slot."""

    def wrap(
        fn: Callable[[Any, Any, aio.ServicerContext], AsyncIterator[Resp]],
    ) -> Callable[[Any, Any, aio.ServicerContext], AsyncIterator[Resp]]:
        @functools.wraps(fn)
        async def handler(
            self: Host, request: Any, context: aio.ServicerContext
        ) -> AsyncIterator[Resp]:
            call = _Call(self, method, True)
            try:
                call.begin(context)
                async for response in fn(self, request, context):
                    yield response
            except BaseException as exc:
                await call.fail(context, exc)
                raise  # pragma: no cover - fail() always raises
            finally:
                call.end()

        return handler

    return wrap


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio raises AbortError out of context.abort(); it must propagate untouched.
    return type(exc).__name__ == "AbortError"
