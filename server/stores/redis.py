"""Redis store: entries shared by every server pointing at the same Redis (replicas serve each
other's entries).

Each entry is one Redis hash ``{prefix}e:{key}`` with fields ``meta`` (JSON) and ``data``
(container bytes), written in one MULTI/EXEC transaction (DEL, HSET, optional EXPIRE) so readers
see either nothing or the whole entry. Reads verify the container's sha256 (DATA_LOSS on a
mismatch). Connection problems fail fast (short connect timeout, one immediate retry on a fresh
connection) as UNAVAILABLE naming the Redis address; the pool reconnects by itself once Redis is
back, and the retry keeps a pooled connection that went stale during an outage from failing the
first request after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator

import redis.asyncio as aredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kvpack.errors import DataLoss, NotFound, Unavailable
from kvpack.server.stores.base import Entry, EntryMeta, Store, Usage

CONNECT_TIMEOUT_S = 1.0
# Large entries move at hundreds of MB/s on a LAN; 30 s leaves room for GB-sized containers.
SOCKET_TIMEOUT_S = 30.0


class RedisStore(Store):
    """Entries in Redis at ``url`` under ``prefix``; ``ttl`` seconds (0 = no expiry)."""

    name = "redis"
    usage_is_cheap = False  # a SCAN over the prefix

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

    def _k(self, key: str) -> str:
        return f"{self.prefix}e:{key}"

    def _unavailable(self, e: Exception) -> Unavailable:
        self.on_error()
        return Unavailable(f"redis store at {self.url} is unreachable: {type(e).__name__}: {e}")

    async def close(self) -> None:
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
                await pipe.execute()
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
            raise self._unavailable(e) from e

    async def get(self, key: str) -> Entry:
        try:
            raw_meta, data = await self._redis.hmget(self._k(key), ["meta", "data"])
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
            raise self._unavailable(e) from e
        if raw_meta is None or data is None:
            raise NotFound(f"no entry {key.split('/', 1)[-1]!r}")
        meta = EntryMeta.from_json(raw_meta)
        if meta.sha256 and hashlib.sha256(data).hexdigest() != meta.sha256:
            self.on_error()
            raise DataLoss(f"stored entry {key.split('/', 1)[-1]!r} is damaged (checksum mismatch)")
        return Entry(bytes(data), meta)

    async def stat(self, key: str) -> EntryMeta:
        try:
            raw = await self._redis.hget(self._k(key), "meta")
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
            raise self._unavailable(e) from e
        if raw is None:
            raise NotFound(f"no entry {key.split('/', 1)[-1]!r}")
        return EntryMeta.from_json(raw)

    async def delete(self, key: str) -> bool:
        try:
            return bool(await self._redis.delete(self._k(key)))
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
            raise self._unavailable(e) from e

    async def _scan(self, prefix: str) -> AsyncIterator[str]:
        # Keys contain only [A-Za-z0-9._:/-] (validated), but escape glob characters anyway.
        pattern = _glob_escape(self._k(prefix)) + "*"
        async for raw in self._redis.scan_iter(match=pattern, count=1000):
            yield (raw.decode() if isinstance(raw, bytes) else raw)[len(self._k("")) :]

    async def list(self, prefix: str) -> list[tuple[str, EntryMeta]]:
        try:
            found = sorted([k async for k in self._scan(prefix)])
            if not found:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for k in found:
                    pipe.hget(self._k(k), "meta")
                raws = await pipe.execute()
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
            raise self._unavailable(e) from e
        # An entry may expire or be deleted between SCAN and HGET: skip it.
        return [(k, EntryMeta.from_json(raw)) for k, raw in zip(found, raws, strict=True) if raw]

    async def usage(self) -> Usage:
        """Entries and container bytes under this prefix (one SCAN plus pipelined HSTRLEN)."""
        try:
            found = [k async for k in self._scan("")]
            async with self._redis.pipeline(transaction=False) as pipe:
                for k in found:
                    pipe.hstrlen(self._k(k), "data")
                sizes = await pipe.execute() if found else []
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
            raise self._unavailable(e) from e
        return Usage(int(sum(sizes)), len(found), 0)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
