"""Entry stores behind one interface (:class:`Store`): memory (default), disk, redis."""

from kvpack.server.stores.base import Entry, EntryMeta, Store, Usage

__all__ = ["Entry", "EntryMeta", "Store", "Usage"]
