"""Bearer-token authentication and tenants.

Tokens are configured as ``tenant:token`` pairs; a request carries ``authorization: Bearer <tok>``
metadata. Each token maps to one tenant, whose namespace holds its keys. With no tokens
configured the server is open and every request is tenant :data:`OPEN_TENANT`.

:class:`AuthInterceptor` rejects unauthenticated calls (UNAUTHENTICATED) before any handler runs;
health checks and reflection are exempt so that load balancers and grpcurl work without tokens.
Exempt *streaming* calls (health Watch, reflection) can be held open indefinitely, so they get their
own small cap (``--max-unauthenticated-streams``, :class:`ExemptStreams`): without it, a few
hundred held Watch streams would fill gRPC's server-wide concurrent-RPC cap and starve every
tenant. The servicer asks :meth:`Authenticator.tenant` again for the namespace (a constant-time
scan over a handful of tokens costs microseconds).
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from kvpack.errors import InvalidArgument, ResourceExhausted
from kvpack.server.keys import TENANT_PATTERN
from kvpack.server.rpc import drain

log = logging.getLogger(__name__)

OPEN_TENANT = "default"
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def parse_tokens(pairs: Iterable[str]) -> list[tuple[str, str]]:
    """``["team-a:s3cret", ...]`` -> ``[("team-a", "s3cret"), ...]``; blank lines and ``#``
    comments are skipped. InvalidArgument on a malformed pair (the token is never echoed)."""
    out: list[tuple[str, str]] = []
    for n, raw in enumerate(pairs, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, token = line.partition(":")
        tenant, token = tenant.strip(), token.strip()
        if not sep or not token or not TENANT_PATTERN.fullmatch(tenant):
            raise InvalidArgument(
                f"auth token entry {n} is not 'tenant:token' with tenant of "
                "[A-Za-z0-9._-]{1,64} and a non-empty token"
            )
        out.append((tenant, token))
    return out


def load_tokens(inline: str, path: str) -> list[tuple[str, str]]:
    """Tokens from ``--auth-tokens`` (comma-separated) and ``--auth-tokens-file`` together,
    checked by :func:`check_one_tenant_per_token`."""
    pairs = parse_tokens(inline.split(",")) if inline else []
    if path:
        try:
            pairs += parse_tokens(Path(path).read_text().splitlines())
        except OSError as e:
            raise InvalidArgument(f"cannot read --auth-tokens-file {path}: {e}") from e
    check_one_tenant_per_token(pairs)
    return pairs


def check_one_tenant_per_token(pairs: Sequence[tuple[str, str]]) -> None:
    """InvalidArgument naming both tenants when one token is configured for two of them: the
    token would authenticate only the first, leaving the second silently unreachable. The token
    itself is never echoed.

    One tenant with several tokens is allowed (rotation: add the new token, move clients, remove
    the old one), and so is the same ``tenant:token`` pair listed twice (e.g. inline and in the
    file)."""
    owner: dict[str, str] = {}
    for tenant, token in pairs:
        first = owner.setdefault(token, tenant)
        if first != tenant:
            raise InvalidArgument(
                f"auth tokens: tenants {first!r} and {tenant!r} are configured with the same "
                "token (in --auth-tokens / --auth-tokens-file); each token must belong to one "
                "tenant"
            )


class Authenticator:
    """Maps bearer tokens to tenants in constant time per token."""

    def __init__(self, tokens: Sequence[tuple[str, str]]) -> None:
        check_one_tenant_per_token(tokens)
        self._tokens = [(tenant, token.encode()) for tenant, token in tokens]

    @property
    def required(self) -> bool:
        """True when tokens are configured (the server is not open)."""
        return bool(self._tokens)

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The tenant of the call's bearer token, :data:`OPEN_TENANT` on an open server, or None
        when the token is missing or wrong."""
        if not self._tokens:
            return OPEN_TENANT
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
                break
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        given = presented.strip().encode()
        found: str | None = None
        # Compare against every token (no early exit) so timing does not reveal which matched.
        for tenant, token in self._tokens:
            if hmac.compare_digest(given, token) and found is None:
                found = tenant
        return found


#: A call without a valid token whose client is still uploading reads at most this much (and
#: for at most DENY_DRAIN_SECONDS) before its UNAUTHENTICATED: answered while the client still
#: writes, grpc.aio clients report INTERNAL "Internal error from Core" instead (see rpc.drain).
#: Small, so that calls without a token hold nothing for long.
DENY_DRAIN_BYTES = 1 << 20
DENY_DRAIN_SECONDS = 0.5


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that fails with UNAUTHENTICATED."""

    async def deny(request: Any, context: aio.ServicerContext) -> None:
        if handler.request_streaming:
            await drain(request, DENY_DRAIN_BYTES, DENY_DRAIN_SECONDS)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: aio.ServicerContext) -> Any:
        await deny(request, context)
        yield  # pragma: no cover - abort raises; this makes the function an async generator

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class ExemptStreams:
    """Counts exempt streaming calls in flight (health Watch, reflection); beyond ``limit`` new
    ones get RESOURCE_EXHAUSTED. They need no token, so they are kept apart from (and far below)
    the capacity the tenants' calls use."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> None:
        """Take a slot or raise ResourceExhausted naming the flag."""
        if self.active >= self.limit:
            raise ResourceExhausted(
                f"server is at its limit of {self.limit} concurrent streaming calls without a "
                "token (health Watch, reflection; --max-unauthenticated-streams); retry later"
            )
        self.active += 1

    def release(self) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        self.active -= 1

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` (a streaming one) holding a slot while it runs. The slot is released in
        ``finally``, so also when the client cancels (the handler task is cancelled) or the call
        fails."""
        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self._limited(handler.stream_stream), **kw)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._limited(handler.stream_unary), **kw)
        return grpc.unary_stream_rpc_method_handler(self._limited(handler.unary_stream), **kw)

    def _limited(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """``behavior`` counted against the cap; async generators (reflection) and coroutines
        that write with ``context.write`` (health Watch) alike."""

        async def acquire_or_abort(context: aio.ServicerContext) -> None:
            try:
                self.acquire()
            except ResourceExhausted as e:
                await context.abort(e.code, e.message)

        if inspect.isasyncgenfunction(behavior):

            async def limited_stream(request: Any, context: aio.ServicerContext) -> Any:
                await acquire_or_abort(context)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    self.release()

            return limited_stream

        async def limited(request: Any, context: aio.ServicerContext) -> Any:
            await acquire_or_abort(context)
            try:
                return await behavior(request, context)
            finally:
                self.release()

        return limited


class AuthInterceptor(aio.ServerInterceptor):
    """Rejects calls without a valid bearer token; health and reflection pass, their streaming
    calls limited to ``max_exempt_streams`` at once (with or without a token, open server too)."""

    def __init__(self, auth: Authenticator, *, max_exempt_streams: int) -> None:
        self._auth = auth
        self.exempt_streams = ExemptStreams(max_exempt_streams)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None:
            return handler
        if method.startswith(EXEMPT_PREFIXES):
            streaming = handler.request_streaming or handler.response_streaming
            return self.exempt_streams.wrap(handler) if streaming else handler
        if not self._auth.required:
            return handler
        if self._auth.tenant(handler_call_details.invocation_metadata) is None:
            return _abort_handler(
                handler,
                "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
            )
        return handler
