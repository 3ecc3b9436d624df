"""Domain errors and their one mapping to and from gRPC status codes.

Server code raises these; the servicer's error handling turns them into
``context.abort(exc.code, exc.message)``. The client turns a ``grpc.RpcError`` back into the typed
exception with :func:`from_rpc_error`, so ``except kvpack.errors.NotFound`` works on both sides.

Messages are truncated to :data:`MAX_MESSAGE_CHARS` so that status details stay well under gRPC's
metadata limits (trailers carry them).
"""

from __future__ import annotations

from typing import ClassVar

import grpc

MAX_MESSAGE_CHARS = 3500  # status message + details must stay under ~4 KB of trailers


class KVPackError(Exception):
    """Base of every kvpack error; ``code`` is the gRPC status it travels as."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message

    @property
    def status(self) -> grpc.StatusCode:
        """The gRPC status code of this error (same as ``type(self).code``)."""
        return self.code


class Internal(KVPackError):
    """A bug or an unexpected failure on the server."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(KVPackError):
    """The request is malformed: bad header, order, shape, dtype, key or setting."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KVPackError):
    """No entry under that key in the caller's namespace (also: another tenant's key)."""

    code = grpc.StatusCode.NOT_FOUND


class DataLoss(KVPackError):
    """A stored entry is damaged (checksum or format error); it never decodes to wrong data."""

    code = grpc.StatusCode.DATA_LOSS


class ResourceExhausted(KVPackError):
    """A server limit was hit (concurrent streams, request bytes, store budget)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(KVPackError):
    """The server or its store cannot be reached right now; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(KVPackError):
    """Missing or wrong bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KVPackError):
    """Authenticated but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(KVPackError):
    """The call's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(KVPackError):
    """The request is well formed but the system is not in a state to serve it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(KVPackError):
    """The call was cancelled (usually by the client)."""

    code = grpc.StatusCode.CANCELLED


_ALL: tuple[type[KVPackError], ...] = (
    Internal,
    InvalidArgument,
    NotFound,
    DataLoss,
    ResourceExhausted,
    Unavailable,
    Unauthenticated,
    PermissionDenied,
    DeadlineExceeded,
    FailedPrecondition,
    Cancelled,
)

#: grpc.StatusCode -> exception class (the reverse of each class's ``code``).
BY_CODE: dict[grpc.StatusCode, type[KVPackError]] = {cls.code: cls for cls in _ALL}


def error_for_code(code: grpc.StatusCode, message: str) -> KVPackError:
    """The typed exception for ``code``; codes without a class (e.g. UNKNOWN) become
    :class:`Internal` with the code's name in front of the message."""
    cls = BY_CODE.get(code)
    if cls is None:
        return Internal(f"{code.name}: {message}")
    return cls(message)


def from_rpc_error(err: grpc.RpcError) -> KVPackError:
    """Typed exception for a failed call (sync ``grpc.Call`` or aio ``AioRpcError``)."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = (details_fn() if callable(details_fn) else None) or str(err)
    return error_for_code(code, details)
