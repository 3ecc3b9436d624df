"""Redis store: entries shared by every server pointing at the same Redis (replicas serve each
other's entries).

Each entry is one Redis hash ``{prefix}e:{key}`` with fields ``meta`` (JSON) and ``data``
(container bytes), written in one MULTI/EXEC transaction (DEL, HSET, optional EXPIRE) so readers
see either nothing or the whole entry. Reads verify the container's sha256 (DATA_LOSS on a
mismatch). Connection problems fail fast (short connect timeout, one immediate retry on a fresh
connection) as UNAVAILABLE naming the Redis address; the pool reconnects by itself once Redis is
back, and the retry keeps a pooled connection that went stale during an outage from failing the
first request after it.

List index: the sorted set ``{prefix}idx`` (score 0, member = full key) holds every entry's key,
added and removed in the same MULTI/EXEC as the entry, so a page of List is one ZRANGEBYLEX over
the caller's prefix range (O(log n + page), never a SCAN of the keyspace). An entry that expired
(TTL) leaves a stale member: List skips it and removes it (only if the entry is still absent, in
one script, so a racing put is never unindexed), and :meth:`usage` prunes every stale member it
walks. Entries written before the index existed (or by an older server) are indexed when a server
opens the store, by one SCAN in a background task (List may miss them until it finishes; see
:meth:`RedisStore.index_rebuilt`).

Metadata vs container: the metadata is validated field by field (a mistyped field is DATA_LOSS
for that key; List skips the entry), but not cross-checked against the container on Stat, which
would move the whole container out of Redis. Unlike a file on disk, a hash is written whole by
one transaction from metadata the server derived from the verified container, and Redis checks
its own persistence (RDB checksum) on load; the sha256 still ties the data to its metadata on
every read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import cast

import redis.asyncio as aredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kvpack.errors import DataLoss, NotFound, ResourceExhausted, Unavailable
from kvpack.server.stores.base import Entry, EntryMeta, Store, Usage

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
# Large entries move at hundreds of MB/s on a LAN; 30 s leaves room for GB-sized containers.
SOCKET_TIMEOUT_S = 30.0
#: Index members read per round trip by usage() and the rebuild.
BATCH = 1000
#: KEYS[1] the index, KEYS[i + 1] the entry hash of member ARGV[i]: remove each member whose entry
#: is gone. In one script, so a put that re-creates the entry in between cannot be unindexed.
_PRUNE = """
local removed = 0
for i, member in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('ZREM', KEYS[1], member)
  end
end
return removed
"""
# Every error redis-py raises: an outage is UNAVAILABLE, a full Redis (maxmemory with
# noeviction) RESOURCE_EXHAUSTED, and nothing reaches the client as INTERNAL.
_ERRORS = (rexc.RedisError, OSError)
# redis-py raises it for "OOM command not allowed"; types-redis does not declare it.
_OUT_OF_MEMORY = cast(type[Exception], vars(rexc)["OutOfMemoryError"])


def shown(key: str) -> str:
    """``key`` as its caller knows it (namespace stripped: messages never show tenants)."""
    return key.split("/", 1)[-1]


class RedisStore(Store):
    """Entries in Redis at ``url`` under ``prefix``; ``ttl`` seconds (0 = no expiry)."""

    name = "redis"
    usage_is_cheap = False  # a walk of the index

    def __init__(self, url: str, *, prefix: str = "kvpack:", ttl: float = 0.0) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self._redis = aredis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            # One immediate retry on a connection error only: a stale pooled socket is replaced
            # transparently, while a refused connection still fails within CONNECT_TIMEOUT_S.
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[rexc.ConnectionError],
            retry_on_timeout=False,
            health_check_interval=30,
        )
        self._idx = f"{prefix}idx"
        self._prune_script = self._redis.register_script(_PRUNE)
        self._rebuild: asyncio.Task[None] | None = None

    def _k(self, key: str) -> str:
        return f"{self.prefix}e:{key}"

    def _unavailable(self, e: Exception) -> Unavailable | ResourceExhausted:
        """The status of a failed Redis command: RESOURCE_EXHAUSTED when Redis is full (not
        retried by clients: retrying cannot help), UNAVAILABLE otherwise."""
        self.on_error()
        if isinstance(e, _OUT_OF_MEMORY):
            return ResourceExhausted(
                f"redis store at {self.url} is full (its maxmemory is reached and its policy "
                f"evicts nothing): {e}"
            )
        if isinstance(e, (rexc.ConnectionError, rexc.TimeoutError, OSError)):
            return Unavailable(f"redis store at {self.url} is unreachable: {type(e).__name__}: {e}")
        return Unavailable(f"redis store at {self.url} refused a command: {type(e).__name__}: {e}")

    def _meta(self, key: str, raw: bytes | str) -> EntryMeta:
        """Parsed metadata of ``key``; DataLoss naming the key and the damaged field."""
        try:
            return EntryMeta.from_json(raw)
        except DataLoss as e:
            self.on_error()
            raise DataLoss(f"stored entry {shown(key)!r} is damaged: {e.message}") from None

    async def open(self) -> None:
        """Index entries written before the index existed, in the background (see module doc)."""
        self._rebuild = asyncio.create_task(self._rebuild_index())

    async def index_rebuilt(self) -> None:
        """Wait for the index rebuild started by :meth:`open` (tests and tools)."""
        if self._rebuild is not None:
            await asyncio.shield(self._rebuild)

    async def _rebuild_index(self) -> None:
        try:
            batch: list[str] = []
            async for key in self._scan(""):
                batch.append(key)
                if len(batch) >= BATCH:
                    await self._redis.zadd(self._idx, dict.fromkeys(batch, 0))
                    batch = []
            if batch:
                await self._redis.zadd(self._idx, dict.fromkeys(batch, 0))
        except _ERRORS as e:
            # Not fatal: requests report the outage themselves; the next open indexes again.
            log.warning("redis store at %s: List index not rebuilt: %s", self.url, e)

    async def close(self) -> None:
        if self._rebuild is not None:
            self._rebuild.cancel()
            await asyncio.wait([self._rebuild])  # let it finish cancelling; raises nothing
        await self._redis.aclose()  # type: ignore[attr-defined]  # stubs predate aclose

    async def put(self, key: str, data: bytes, meta: EntryMeta) -> None:
        if not meta.sha256:
            meta = dataclasses.replace(meta, sha256=hashlib.sha256(data).hexdigest())
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._k(key))
                pipe.hset(self._k(key), mapping={"meta": meta.to_json(), "data": data})
                if self.ttl:
                    pipe.pexpire(self._k(key), int(self.ttl * 1000))
                pipe.zadd(self._idx, {key: 0})
                await pipe.execute()
        except _ERRORS as e:
            raise self._unavailable(e) from e

    async def get(self, key: str) -> Entry:
        try:
            raw_meta, data = await self._redis.hmget(self._k(key), ["meta", "data"])
        except _ERRORS as e:
            raise self._unavailable(e) from e
        if raw_meta is None or data is None:
            raise NotFound(f"no entry {shown(key)!r}")
        meta = self._meta(key, raw_meta)
        if meta.sha256 and hashlib.sha256(data).hexdigest() != meta.sha256:
            self.on_error()
            raise DataLoss(f"stored entry {shown(key)!r} is damaged (checksum mismatch)")
        return Entry(bytes(data), meta)

    async def stat(self, key: str) -> EntryMeta:
        try:
            raw = await self._redis.hget(self._k(key), "meta")
        except _ERRORS as e:
            raise self._unavailable(e) from e
        if raw is None:
            raise NotFound(f"no entry {shown(key)!r}")
        return self._meta(key, raw)

    async def delete(self, key: str) -> bool:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._k(key))
                pipe.zrem(self._idx, key)
                deleted, _ = await pipe.execute()
        except _ERRORS as e:
            raise self._unavailable(e) from e
        return bool(deleted)

    async def _scan(self, prefix: str) -> AsyncIterator[str]:
        # Keys contain only [A-Za-z0-9._:/-] (validated), but escape glob characters anyway.
        pattern = _glob_escape(self._k(prefix)) + "*"
        async for raw in self._redis.scan_iter(match=pattern, count=1000):
            yield (raw.decode() if isinstance(raw, bytes) else raw)[len(self._k("")) :]

    async def _members(self, low: bytes, high: bytes, count: int) -> list[str]:
        """Up to ``count`` index members in the lex range [low, high] (Redis range syntax)."""
        found = await self._redis.zrangebylex(self._idx, low, high, start=0, num=count)
        return [m.decode() if isinstance(m, bytes) else m for m in found]

    async def _prune(self, keys: list[str]) -> None:
        """Drop the index members of ``keys`` whose entries are gone (expired or deleted)."""
        if keys:
            await self._prune_script(keys=[self._idx, *map(self._k, keys)], args=keys)

    async def list_page(self, prefix: str, after: str, limit: int) -> list[tuple[str, EntryMeta]]:
        # Members are ASCII keys, so prefix + 0xff bounds every key that starts with prefix.
        low = b"(" + after.encode() if after >= prefix else b"[" + prefix.encode()
        high = b"[" + prefix.encode() + b"\xff" if prefix else b"+"
        out: list[tuple[str, EntryMeta]] = []
        try:
            # Stale or damaged members are skipped, so a round may yield fewer than it read.
            while len(out) < limit:
                want = limit - len(out)
                keys = await self._members(low, high, want)
                if not keys:
                    break
                async with self._redis.pipeline(transaction=False) as pipe:
                    for k in keys:
                        pipe.hget(self._k(k), "meta")
                    raws = await pipe.execute()
                out += self._parsed(keys, raws)
                await self._prune([k for k, raw in zip(keys, raws, strict=True) if raw is None])
                if len(keys) < want:
                    break
                low = b"(" + keys[-1].encode()
        except _ERRORS as e:
            raise self._unavailable(e) from e
        return out

    def _parsed(self, keys: list[str], raws: list[bytes | None]) -> list[tuple[str, EntryMeta]]:
        """(key, meta) of the entries still there; damaged metadata is counted and skipped (it
        is DATA_LOSS for its own key on Stat and Fetch)."""
        out = []
        for k, raw in zip(keys, raws, strict=True):
            if raw is None:
                continue  # expired or deleted since it was indexed
            try:
                out.append((k, self._meta(k, raw)))
            except DataLoss as e:
                log.warning("redis store: List skips a damaged entry: %s", e.message)
        return out

    async def usage(self) -> Usage:
        """Entries and container bytes under this prefix: a walk of the index in batches with
        pipelined HSTRLEN, pruning the members of entries that are gone."""
        entries = total = 0
        low = b"-"
        try:
            while keys := await self._members(low, b"+", BATCH):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for k in keys:
                        pipe.hstrlen(self._k(k), "data")
                    sizes = await pipe.execute()
                entries += sum(1 for s in sizes if s)
                total += int(sum(sizes))
                # An entry's data is never empty (a container), so 0 means it is gone.
                await self._prune([k for k, s in zip(keys, sizes, strict=True) if not s])
                if len(keys) < BATCH:
                    break
                low = b"(" + keys[-1].encode()
        except _ERRORS as e:
            raise self._unavailable(e) from e
        return Usage(total, entries, 0)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
