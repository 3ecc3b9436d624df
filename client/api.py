"""The client surface: what :class:`~kvpack.client.KVPackClient`, :class:`LocalKVPack` (both
:class:`KVPack`) and :class:`~kvpack.client.AsyncKVPackClient` (:class:`AsyncKVPack`) offer.

``compress``'s keyword arguments are declared once, in :class:`CompressOptions`; every
implementation takes them as ``**options: Unpack[CompressOptions]`` and checks their names with
:func:`check_options`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol, Unpack

import torch

from kvpack.client.result import CompressResult, EntryInfo, ServerInfo
from kvpack.codec import DecodedCache
from kvpack.engine.request import RequestOptions

#: The stacked ``[L, B, Hkv, n, d]`` cache or its per-layer ``[B, Hkv, n, d]`` tensors.
Tensors = Sequence[torch.Tensor] | torch.Tensor
#: A half-open ``(start, end)`` layer range or a step-1 range; None = every layer.
Layers = tuple[int, int] | range | None


class CompressOptions(RequestOptions, total=False):
    """``compress``'s keyword arguments: :class:`~kvpack.engine.RequestOptions` plus the
    attention statistics, at most one of ``scores`` ``[L, B, H, n]`` (H query or KV heads,
    see ``kvpack.client.hf``) and ``window_queries`` ``[L, B, Hq, W, d]`` (observation-window
    queries after RoPE; they are scored against each layer's keys)."""

    scores: torch.Tensor | None
    window_queries: torch.Tensor | None


def check_options(options: dict[str, Any]) -> None:
    """TypeError naming an argument ``compress`` does not take, as Python would for a
    misspelt keyword."""
    unknown = sorted(set(options) - set(CompressOptions.__optional_keys__))
    if unknown:
        raise TypeError(f"compress() got an unexpected keyword argument {unknown[0]!r}")


class KVPack(Protocol):
    """A kvpack store: a server through :class:`~kvpack.client.KVPackClient`, or
    :class:`~kvpack.client.LocalKVPack` in this process. Errors are :mod:`kvpack.errors`
    exceptions."""

    def compress(
        self, keys: Tensors, values: Tensors, **options: Unpack[CompressOptions]
    ) -> CompressResult:
        """Compress a prefilled cache (per-layer ``[B, Hkv, n, d]``); store its encoding and/or
        return the composite cache (see :class:`CompressOptions`)."""
        ...

    def fetch(
        self, key: str, layers: Layers = None, *, device: torch.device | str | None = None
    ) -> DecodedCache:
        """The stored entry decoded on ``device`` (default CPU)."""
        ...

    def put(self, blob: bytes, key: str | None = None) -> str:
        """Store an encoded container; its key (content-derived when ``key`` is None)."""
        ...

    def stat(self, key: str) -> EntryInfo: ...

    def list(self, prefix: str = "", *, page_size: int = 0) -> Iterator[EntryInfo]: ...

    def delete(self, key: str) -> None: ...

    def info(self) -> ServerInfo: ...


class AsyncKVPack(Protocol):
    """:class:`KVPack` for asyncio (:class:`~kvpack.client.AsyncKVPackClient`)."""

    async def compress(
        self, keys: Tensors, values: Tensors, **options: Unpack[CompressOptions]
    ) -> CompressResult: ...

    async def fetch(
        self, key: str, layers: Layers = None, *, device: torch.device | str | None = None
    ) -> DecodedCache: ...

    async def put(self, blob: bytes, key: str | None = None) -> str: ...

    async def stat(self, key: str) -> EntryInfo: ...

    def list(self, prefix: str = "", *, page_size: int = 0) -> AsyncIterator[EntryInfo]: ...

    async def delete(self, key: str) -> None: ...

    async def info(self) -> ServerInfo: ...
