"""rpc.unary / rpc.streaming when the call is already over: its status, quietly.

A handler that notices an expired deadline itself (check_deadline between stages) raises before
gRPC's cancellation reaches it. The wrappers must end such a call with DEADLINE_EXCEEDED through
``context.abort``: re-raised, gRPC logs the exception as an unexpected servicer error with its
traceback, and the log record keeps the handler's frames (a whole Compress session) alive.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from kvpack.server import rpc
from kvpack.server.limits import StreamLimiter
from kvpack.server.metrics import Metrics
from tests.reliability.test_faults import wait_for


class Session:
    """Stands for per-call state the handler holds (a CompressSession in the server)."""


class Host:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.streams = StreamLimiter(4, per_tenant=4)
        self.sessions: list[weakref.ref[Session]] = []

    def tenant(self, context: aio.ServicerContext) -> str:
        return "default"

    def _expire(self, context: aio.ServicerContext) -> None:
        session = Session()
        self.sessions.append(weakref.ref(session))
        # Block the event loop past the deadline, so gRPC cannot cancel the handler first,
        # then fail as a stage would after noticing the expiry.
        time.sleep(0.3)
        rpc.check_deadline(context, "test stage")

    @rpc.unary("Slow")
    async def slow(self, request: bytes, context: aio.ServicerContext) -> bytes:
        self._expire(context)
        return b"unreachable"

    @rpc.streaming("SlowStream")
    async def slow_stream(
        self, request: bytes, context: aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._expire(context)
        yield b"unreachable"


@pytest.fixture
async def host_address() -> AsyncIterator[tuple[Host, str]]:
    host = Host()
    handlers = {
        "Slow": grpc.unary_unary_rpc_method_handler(host.slow),
        "SlowStream": grpc.unary_stream_rpc_method_handler(host.slow_stream),
    }
    server = aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Test", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield host, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.mark.parametrize("method", ["Slow", "SlowStream"])
async def test_expired_call_ends_with_its_status_without_an_error_log(
    host_address: tuple[Host, str], method: str, caplog: pytest.LogCaptureFixture
) -> None:
    host, address = host_address
    caplog.set_level(logging.INFO)
    async with aio.insecure_channel(address) as channel:
        path = f"/t.Test/{method}"
        call: Any = (
            channel.unary_unary(path)(b"", timeout=0.1)
            if method == "Slow"
            else channel.unary_stream(path)(b"", timeout=0.1)
        )
        with pytest.raises(aio.AioRpcError) as err:
            if method == "Slow":
                await call
            else:
                async for _ in call:
                    pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's deadline fires on its own; the server's handler ends a moment later.
    labels = {"method": method, "code": "DEADLINE_EXCEEDED"}
    await wait_for(
        lambda: host.metrics.registry.get_sample_value("kvpack_requests_total", labels) == 1.0,
        5,
        "DEADLINE_EXCEEDED counted",
    )
    assert host.metrics.inflight_streams.labels(method)._value.get() == 0
    assert host.streams.active == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    gc.collect()
    assert [ref() for ref in host.sessions] == [None]
