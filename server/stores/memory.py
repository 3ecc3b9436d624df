"""In-memory store with a byte budget and least-recently-used eviction (the default store)."""

from __future__ import annotations

from collections import OrderedDict

from kvpack.errors import NotFound, ResourceExhausted
from kvpack.server.stores.base import Entry, EntryMeta, SortedKeys, Store, Usage


class MemoryStore(Store):
    """Entries in one process's memory. ``budget_bytes`` caps the container bytes held
    (0 = unbounded); putting past it evicts least recently used whole entries first.

    All methods run on the event loop without awaiting in between, so an entry is inserted or
    evicted as a whole; nobody sees half of one. Metadata is held as the server made it (never
    serialised), so there is nothing to cross-check on Stat.
    """

    name = "memory"

    def __init__(self, budget_bytes: int = 0) -> None:
        super().__init__()
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._sorted = SortedKeys()  # the same keys in key order, for paged List
        self._bytes = 0

    async def put(self, key: str, data: bytes, meta: EntryMeta) -> None:
        if self.budget_bytes and len(data) > self.budget_bytes:
            raise ResourceExhausted(
                f"entry of {len(data)} bytes exceeds the memory store budget of "
                f"{self.budget_bytes} bytes (--store-bytes)"
            )
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.data)
        while self.budget_bytes and self._bytes + len(data) > self.budget_bytes:
            gone, evicted = self._entries.popitem(last=False)
            self._sorted.discard(gone)
            self._bytes -= len(evicted.data)
            self.on_evict(1)
        self._entries[key] = Entry(bytes(data), meta)
        self._sorted.add(key)
        self._bytes += len(data)

    async def get(self, key: str) -> Entry:
        try:
            entry = self._entries[key]
        except KeyError:
            raise NotFound(f"no entry {key.split('/', 1)[-1]!r}") from None
        self._entries.move_to_end(key)
        return entry

    async def stat(self, key: str) -> EntryMeta:
        try:
            return self._entries[key].meta
        except KeyError:
            raise NotFound(f"no entry {key.split('/', 1)[-1]!r}") from None

    async def delete(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._sorted.discard(key)
        self._bytes -= len(entry.data)
        return True

    async def list_page(self, prefix: str, after: str, limit: int) -> list[tuple[str, EntryMeta]]:
        return [(k, self._entries[k].meta) for k in self._sorted.page(prefix, after, limit)]

    async def usage(self) -> Usage:
        return Usage(self._bytes, len(self._entries), self.budget_bytes)
