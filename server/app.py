"""Assembles and runs one kvpack server: gRPC (servicer, health, reflection, auth), metrics, store.

:class:`KVPackServer` is what both `kvpack serve` and the tests use::

    server = KVPackServer(ServerConfig(port=0, metrics_port=0))
    await server.start()            # binds; server.port is the bound port
    ...
    await server.stop(grace=1.0)    # health NOT_SERVING, drain, close store and pool
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from kvpack import codec
from kvpack.errors import InvalidArgument, KVPackError
from kvpack.options import server_options
from kvpack.server.auth import Authenticator, AuthInterceptor, load_tokens
from kvpack.server.config import ServerConfig
from kvpack.server.metrics import Metrics, MetricsHTTP
from kvpack.server.servicer import KVPackServicer, add_to_server
from kvpack.server.stores.base import Store
from kvpack.v1 import kvpack_pb2

log = logging.getLogger(__name__)

GAUGE_REFRESH_S = 15.0
#: Concurrent unary calls (Stat, List, Info, Delete, Health.Check, calls refused for a bad token
#: or a full limit in their last moments) gRPC admits on top of every stream slot.
UNARY_HEADROOM = 256
SERVICE_NAME = kvpack_pb2.DESCRIPTOR.services_by_name["KVPack"].full_name  # "kvpack.v1.KVPack"


def make_store(config: ServerConfig) -> Store:
    """The store named by ``config.store``."""
    if config.store == "disk":
        from kvpack.server.stores.disk import DiskStore

        return DiskStore(Path(config.disk_path))
    if config.store == "redis":
        from kvpack.server.stores.redis import RedisStore

        return RedisStore(config.redis_url, prefix=config.redis_prefix, ttl=config.redis_ttl)
    from kvpack.server.stores.memory import MemoryStore

    return MemoryStore(config.store_bytes)


def concurrent_rpc_cap(config: ServerConfig) -> int:
    """gRPC's server-wide ``maximum_concurrent_rpcs``: a memory backstop against floods of unary
    calls, sized so that it is never reached before the server's own limits, which refuse with a
    message naming their flag. Streams are bounded by the servicer (``max_concurrent_streams``;
    the per-tenant cap is within it) and by the interceptor (``max_unauthenticated_streams``), so
    the cap is their sum plus :data:`UNARY_HEADROOM`. Calls without a token cannot hold more than
    their own cap: unary ones end at once, bad-token ones are refused before any handler runs."""
    return config.max_concurrent_streams + config.max_unauthenticated_streams + UNARY_HEADROOM


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mTLS with ``tls_client_ca``) credentials, or None for plaintext."""
    if not config.tls_cert:
        return None
    try:
        cert = Path(config.tls_cert).read_bytes()
        key = Path(config.tls_key).read_bytes()
        ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as e:
        raise InvalidArgument(f"cannot read TLS files: {e}") from e
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class KVPackServer:
    """One server instance (own metrics registry, store, thread pool)."""

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        config.validate()
        self.config = config
        self.store = store or make_store(config)
        self.auth = Authenticator(load_tokens(config.auth_tokens, config.auth_tokens_file))
        self.auth_interceptor = AuthInterceptor(
            self.auth, max_exempt_streams=config.max_unauthenticated_streams
        )
        self.metrics = Metrics(policies=codec.POLICIES, store=self.store.name)
        self.store.on_evict = self.metrics.store_evictions.labels(self.store.name).inc
        self.store.on_error = self.metrics.store_errors.labels(self.store.name).inc
        self.executor = ThreadPoolExecutor(config.workers, thread_name_prefix="kvpack-codec")
        self.health = HealthServicer()
        self.servicer = KVPackServicer(config, self.store, self.auth, self.metrics, self.executor)
        self.port = 0
        self.metrics_http: MetricsHTTP | None = None
        self._server: aio.Server | None = None
        self._gauges: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """``host:port`` clients dial."""
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Open the store, bind and start serving; health turns SERVING last."""
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.store.open()
        server = aio.server(
            interceptors=[self.auth_interceptor],
            options=server_options(),
            # Backstop only: streams are limited (with a clear message) by the servicer and,
            # without a token, by the interceptor; see concurrent_rpc_cap.
            maximum_concurrent_rpcs=concurrent_rpc_cap(self.config),
        )
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = f"{self.config.host}:{self.config.port}"
        creds = server_credentials(self.config)
        if creds is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, creds)
        # JIT-compile (or load cached) codec kernels before SERVING, off the event loop, so the
        # first request does not pay seconds of compile time.
        await asyncio.get_running_loop().run_in_executor(self.executor, codec.warm_up)
        await server.start()
        self._server = server
        if self.config.metrics_port:
            self.metrics_http = self.metrics.start_http(self.config.host, self.config.metrics_port)
        self._gauges = asyncio.create_task(self._refresh_gauges_forever())
        if not self.auth.required:
            log.warning("no auth tokens configured: the server is open to anyone who can reach it")
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "kvpack serving on %s (%s, store %s, metrics %s)",
            self.address,
            "TLS" if creds else "plaintext",
            self.store.name,
            self.metrics_http.port if self.metrics_http else "off",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, give running calls ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        if self._gauges is not None:
            self._gauges.cancel()
            self._gauges = None
        if self._server is not None:
            await self._server.stop(self.config.grace if grace is None else grace)
            self._server = None
        if self.metrics_http is not None:
            self.metrics_http.close()
            self.metrics_http = None
        await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def _refresh_gauges_forever(self) -> None:
        """Keep the store gauges current even for stores others write to (shared Redis)."""
        while True:
            try:
                await self.servicer.refresh_store_gauges()
            except KVPackError as e:
                log.warning("store gauges not refreshed: %s", e.message)
            await asyncio.sleep(GAUGE_REFRESH_S)

    async def wait(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()
