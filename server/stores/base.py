"""The store interface: entries are container bytes plus small JSON metadata, under full keys.

Keys reaching a store are already namespaced (``tenant/key``, see ``kvpack.server.keys``); stores
know nothing of tenants. An entry becomes visible only when complete, and a damaged entry is a
:class:`kvpack.errors.DataLoss`, never wrong bytes. Metadata is JSON, never pickle.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

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
        """Parse metadata written by :meth:`to_json`; DataLoss naming the field if it is not that.

        Every field's type and range is checked here, so that nothing downstream (Stat, List,
        the protobuf conversion) meets a mistyped value: valid JSON of the wrong shape is as
        damaged as invalid JSON. Missing fields take their defaults (older metadata had fewer);
        unknown fields are ignored.
        """
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise DataLoss(f"entry metadata is damaged: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise DataLoss(
                f"entry metadata is damaged: a JSON {type(data).__name__}, not an object"
            )
        if "stored_bytes" not in data:
            raise DataLoss("entry metadata is damaged: stored_bytes is missing")
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        for name, value in fields.items():
            problem = _FIELD_CHECKS[name](value)
            if problem:
                raise DataLoss(f"entry metadata is damaged: {name} {problem}")
        if "created_unix" in fields:
            fields["created_unix"] = float(fields["created_unix"])
        return cls(**fields)


def _uint(limit: int) -> Callable[[object], str]:
    """Check of an integer field in [0, limit) (bools are not integers here)."""

    def check(value: object) -> str:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, not {type(value).__name__}"
        if not 0 <= value < limit:
            return f"is {value}, outside [0, {limit})"
        return ""

    return check


def _utf8(value: str) -> bool:
    """False for strings protobuf cannot carry: lone surrogates, which JSON escapes can make."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text(value: object) -> str:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    return "" if _utf8(value) else "is not valid UTF-8"


def _sha256(value: object) -> str:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if value and (len(value) != 64 or value.strip("0123456789abcdef")):
        return "must be empty or 64 lowercase hex digits"
    return ""


def _settings(value: object) -> str:
    if not isinstance(value, dict):
        return f"must be an object of strings, not {type(value).__name__}"
    for k, v in value.items():
        if not isinstance(v, str):
            return f"[{k!r}] must be a string, not {type(v).__name__}"
        if not (_utf8(k) and _utf8(v)):
            return "holds a name or value that is not valid UTF-8"
    return ""


def _unix_time(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a number, not {type(value).__name__}"
    return "" if math.isfinite(value) else f"must be finite, not {value}"


#: Field name -> check returning "" or what is wrong. Ranges fit the EntryInfo protobuf fields
#: (sizes in bytes below 2^63, inside uint64; layer count inside uint32), so every value that
#: passes converts.
_FIELD_CHECKS: dict[str, Callable[[object], str]] = {
    "stored_bytes": _uint(1 << 63),
    "original_bytes": _uint(1 << 63),
    "num_layers": _uint(1 << 32),
    "dtype": _text,
    "codec": _text,
    "settings": _settings,
    "created_unix": _unix_time,
    "sha256": _sha256,
}


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
    async def list_page(self, prefix: str, after: str, limit: int) -> list[tuple[str, EntryMeta]]:
        """At most ``limit`` entries whose key starts with ``prefix`` and sorts after ``after``
        ("" = from the first), sorted by key. Costs what it returns, not what the store holds;
        damaged entries are skipped (and counted through ``on_error``), never raised."""

    @abstractmethod
    async def usage(self) -> Usage:
        """Bytes and entries held now."""


class SortedKeys:
    """Keys in sorted order, for paged listing by prefix in O(log n + page) (memory, disk).

    Full keys are ``tenant/key``, so each tenant's keys (and each prefix within one) form one
    contiguous run: a page is a binary search plus the page itself, whatever other tenants hold.
    A plain list kept sorted with :mod:`bisect`: inserting or removing shifts the pointers after
    it (one memmove), cheap next to storing an entry, and needs no extra dependency.
    """

    def __init__(self) -> None:
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str) -> None:
        """Insert ``key`` (no-op if present)."""
        i = bisect.bisect_left(self._keys, key)
        if i == len(self._keys) or self._keys[i] != key:
            self._keys.insert(i, key)

    def discard(self, key: str) -> None:
        """Remove ``key`` (no-op if absent)."""
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]

    def page(self, prefix: str, after: str, limit: int) -> list[str]:
        """At most ``limit`` keys starting with ``prefix`` and greater than ``after``, sorted."""
        # Keys under a prefix are contiguous in sorted order and start at bisect(prefix).
        start = max(bisect.bisect_left(self._keys, prefix), bisect.bisect_right(self._keys, after))
        window = self._keys[start : start + max(limit, 0)]  # a slice copies only the page
        if window and not window[-1].startswith(prefix):
            window = [k for k in window if k.startswith(prefix)]  # contiguous: a head run
        return window
