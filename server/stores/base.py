"""The store interface: entries are container bytes plus small JSON metadata, under full keys.

Keys reaching a store are already namespaced (``tenant/key``, see ``kvpack.server.keys``); stores
know nothing of tenants. An entry becomes visible only when complete, and a damaged entry is a
:class:`kvpack.errors.DataLoss`, never wrong bytes. Metadata is JSON, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from kvpack.errors import DataLoss


@dataclasses.dataclass(frozen=True)
class EntryMeta:
    """What Stat/List report about an entry without reading its bytes.

    ``stored_bytes``: container size; ``original_bytes``: raw bytes of the cache it decodes to;
    ``dtype``: container dtype name of K/V ("bf16", "fp16", "fp32");
    ``codec``: e.g. "lossy/huffman";
    ``sha256``: hex digest of the container, checked on read by stores that keep it.
    """

    stored_bytes: int
    original_bytes: int = 0
    num_layers: int = 0
    dtype: str = ""
    codec: str = ""
    settings: dict[str, str] = dataclasses.field(default_factory=dict)
    created_unix: float = dataclasses.field(default_factory=time.time)
    sha256: str = ""

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> EntryMeta:
        """Parse metadata written by :meth:`to_json`; DataLoss if it is not that."""
        try:
            data: dict[str, Any] = json.loads(raw)
            names = {f.name for f in dataclasses.fields(cls)}
            meta = cls(**{k: v for k, v in data.items() if k in names})
            meta.settings.update({str(k): str(v) for k, v in meta.settings.items()})
            return meta
        except (ValueError, TypeError) as e:
            raise DataLoss(f"entry metadata is damaged: {e}") from e


@dataclasses.dataclass(frozen=True)
class Entry:
    """A stored container and its metadata."""

    data: bytes
    meta: EntryMeta


@dataclasses.dataclass(frozen=True)
class Usage:
    """What the store holds (``bytes``: container bytes; ``budget``: 0 = unbounded)."""

    bytes: int
    entries: int
    budget: int = 0


class Store(ABC):
    """Async key -> entry store. Implementations: memory, disk, redis.

    Errors: NotFound for a missing key, DataLoss for a damaged entry, Unavailable when the
    backend cannot be reached, ResourceExhausted when an entry can never fit.
    ``on_evict(n)`` and ``on_error()`` are called for evictions and failed operations (the server
    points them at its metrics).
    """

    name: str = "store"
    #: False when usage() walks the backend (then the server refreshes gauges on a timer only).
    usage_is_cheap: bool = True

    def __init__(self) -> None:
        self.on_evict: Callable[[int], None] = lambda n: None
        self.on_error: Callable[[], None] = lambda: None

    async def open(self) -> None:  # noqa: B027 - optional hook; most stores need no setup
        """Connect / load the index (called once before serving)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

    @abstractmethod
    async def put(self, key: str, data: bytes, meta: EntryMeta) -> None:
        """Store ``data`` under ``key`` (replacing any entry), visible only once complete."""

    @abstractmethod
    async def get(self, key: str) -> Entry:
        """The entry (checksum verified where the store keeps one)."""

    @abstractmethod
    async def stat(self, key: str) -> EntryMeta:
        """The entry's metadata without its bytes."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove ``key``; False if it was not there."""

    @abstractmethod
    async def list(self, prefix: str) -> list[tuple[str, EntryMeta]]:
        """All entries whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    async def usage(self) -> Usage:
        """Bytes and entries held now."""
