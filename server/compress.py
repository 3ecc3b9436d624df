"""Compress sessions (work in progress: lands with the codec's container format)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from kvpack.errors import FailedPrecondition
from kvpack.v1 import kvpack_pb2 as pb


class CompressSession:
    """One Compress stream."""

    def __init__(self, servicer: Any, tenant: str, context: Any) -> None:
        self.servicer = servicer

    async def run(
        self, requests: AsyncIterator[pb.CompressRequest]
    ) -> AsyncIterator[pb.CompressResponse]:
        raise FailedPrecondition("Compress is not available in this build yet")
        yield pb.CompressResponse()
