"""Disk store: one file per entry in a directory; survives restarts.

File layout (little-endian): ``b"KVPE1\\n"`` magic, u32 header length, header JSON
``{"key": full key, "meta": EntryMeta incl. the container's sha256}``, then the container bytes.
Writes go to a temporary file in the same directory, are fsynced, then ``os.replace``d into
place (and the directory fsynced), so a reader sees either the old entry or the whole new one.
Reads verify the sha256; a mismatch or a truncated file is DATA_LOSS. A full disk (ENOSPC,
EDQUOT, or EFBIG from a file size limit) is RESOURCE_EXHAUSTED, and the temporary file is
removed: a failed put leaves the old entry, if any, untouched.

File names are ``sha256(key).hex() + ".kvpe"``: safe for any key, fixed length (keys up to 200
characters plus a tenant would not fit 255-byte names once escaped). The key -> metadata index is
rebuilt from the files' headers on open; each header is also checked against the container's own
header (read through a memory map: only its first pages), so Stat never reports metadata the
container contradicts. A file found damaged (on open, or by a read) is left in place for
inspection, logged, counted through ``on_error`` and remembered by file name: Stat and Fetch of
its key answer DATA_LOSS, List skips it, a put of the key replaces it. One server process per
directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

from kvpack.errors import DataLoss, KVPackError, NotFound, ResourceExhausted, Unavailable
from kvpack.server import container
from kvpack.server.stores.base import Entry, EntryMeta, SortedKeys, Store, Usage

log = logging.getLogger(__name__)

MAGIC = b"KVPE1\n"
SUFFIX = ".kvpe"
#: errno values of a write that failed for want of room: RESOURCE_EXHAUSTED, not retried.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def file_name(key: str) -> str:
    """The entry file name of ``key``."""
    return hashlib.sha256(key.encode()).hexdigest() + SUFFIX


def shown(key: str) -> str:
    """``key`` as its caller knows it (namespace stripped: messages never show tenants)."""
    return key.split("/", 1)[-1]


class DiskStore(Store):
    """Entries as files under ``root`` (created if missing)."""

    name = "disk"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        self._index: dict[str, EntryMeta] = {}
        self._sorted = SortedKeys()  # the index's keys in order, for paged List
        self._bytes = 0  # container bytes of the indexed entries
        # File name -> what is wrong with it, for files found damaged; the key of such a file
        # may be unreadable, but Stat(key) finds its file by name.
        self._damaged: dict[str, str] = {}

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"disk store directory {self.root} is not usable: {e}") from e
        for path in self.root.glob("*" + SUFFIX):
            try:
                key, meta = self._load(path)
            except DataLoss as e:
                # One damaged file must not stop the server: it is reported for its own key.
                self._note_damaged(path.name, e.message)
                continue
            except OSError as e:
                self._note_damaged(path.name, f"entry file {path.name} is unreadable: {e.strerror}")
                continue
            self._add(key, meta)
        for stale in self.root.glob(".tmp-*"):
            stale.unlink(missing_ok=True)

    def _load(self, path: Path) -> tuple[str, EntryMeta]:
        """Key and metadata of an entry file, checked against the container's own header and
        the file's name. DataLoss naming what is wrong."""
        with path.open("rb") as f:
            key, meta, offset = self._read_header(f, path)
            if file_name(key) != path.name:
                raise DataLoss(f"entry file {path.name} names a key that is not its own")
            try:
                header = container.read_file_header(f, offset)
            except DataLoss as e:
                raise DataLoss(f"entry file {path.name}: {e.message}") from None
            size = os.fstat(f.fileno()).st_size - offset
        wrong = container.meta_mismatches(meta, header, size)
        if wrong:
            raise DataLoss(
                f"entry file {path.name} has metadata its container contradicts: {', '.join(wrong)}"
            )
        return key, meta

    def _note_damaged(self, name: str, why: str) -> None:
        self._damaged[name] = why
        log.warning("disk store: %s is damaged and left in place: %s", self.root / name, why)
        self.on_error()

    def _add(self, key: str, meta: EntryMeta) -> None:
        self._drop(key)
        self._index[key] = meta
        self._sorted.add(key)
        self._bytes += meta.stored_bytes
        self._damaged.pop(file_name(key), None)

    def _drop(self, key: str) -> None:
        meta = self._index.pop(key, None)
        if meta is not None:
            self._sorted.discard(key)
            self._bytes -= meta.stored_bytes

    def _path(self, key: str) -> Path:
        return self.root / file_name(key)

    def _damage(self, key: str) -> DataLoss | None:
        """DataLoss for ``key`` if its file is known to be damaged."""
        why = self._damaged.get(file_name(key))
        if why is None:
            return None
        return DataLoss(f"stored entry {shown(key)!r} is damaged: {why}")

    @staticmethod
    def _read_header(f: BinaryIO, path: Path) -> tuple[str, EntryMeta, int]:
        """(full key, metadata, offset of the container) of an open entry file."""
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise DataLoss(f"entry file {path.name} is not a kvpack entry (bad magic)")
        (meta_len,) = struct.unpack("<I", head[len(MAGIC) :])
        raw = f.read(meta_len)
        if len(raw) != meta_len:
            raise DataLoss(f"entry file {path.name} is truncated in its metadata")
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise DataLoss(f"entry file {path.name} has a damaged header: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
            raise DataLoss(f"entry file {path.name} has a damaged header: no key")
        try:
            meta = EntryMeta.from_json(json.dumps(doc.get("meta")))
        except DataLoss as e:
            raise DataLoss(f"entry file {path.name} has a damaged header: {e.message}") from None
        return doc["key"], meta, len(head) + meta_len

    async def put(self, key: str, data: bytes, meta: EntryMeta) -> None:
        if not meta.sha256:
            meta = dataclasses.replace(meta, sha256=hashlib.sha256(data).hexdigest())
        try:
            await asyncio.to_thread(self._write, key, data, meta)
        except OSError as e:
            self.on_error()
            raise self._write_error(e, len(data)) from e
        self._add(key, meta)

    def _write_error(self, e: OSError, nbytes: int) -> KVPackError:
        """RESOURCE_EXHAUSTED when the disk has no room (retrying cannot help until an operator
        frees some); UNAVAILABLE for other I/O errors."""
        if e.errno in FULL_ERRNOS:
            return ResourceExhausted(
                f"disk store at {self.root} is full: an entry of {nbytes} bytes could not be "
                f"written ({errno.errorcode.get(e.errno, e.errno)}: {os.strerror(e.errno)})"
            )
        return Unavailable(f"disk store write failed: {e}")

    def _write(self, key: str, data: bytes, meta: EntryMeta) -> None:
        raw = json.dumps({"key": key, "meta": json.loads(meta.to_json())}).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(raw)) + raw)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(key))
        except BaseException:
            # Nothing half-written stays behind (a full disk fails here, mid-write or at close).
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    async def get(self, key: str) -> Entry:
        known = self._damage(key)
        if known is not None:
            raise known
        try:
            return await asyncio.to_thread(self._read, key)
        except FileNotFoundError:
            self._drop(key)
            raise NotFound(f"no entry {shown(key)!r}") from None
        except DataLoss as e:
            # Damaged since it was indexed: from now on Stat says so and List skips it.
            self._drop(key)
            self._note_damaged(file_name(key), e.message)
            raise DataLoss(f"stored entry {shown(key)!r} is damaged: {e.message}") from None
        except OSError as e:
            self.on_error()
            raise Unavailable(f"disk store read failed: {e}") from e

    def _read(self, key: str) -> Entry:
        path = self._path(key)
        with path.open("rb") as f:
            stored_key, meta, _ = self._read_header(f, path)
            data = f.read()
        if stored_key != key:
            raise DataLoss(f"entry file {path.name} holds a different key")
        if len(data) != meta.stored_bytes or hashlib.sha256(data).hexdigest() != meta.sha256:
            raise DataLoss("checksum mismatch on disk")
        return Entry(data, meta)

    async def stat(self, key: str) -> EntryMeta:
        meta = self._index.get(key)
        if meta is not None:
            return meta
        known = self._damage(key)
        if known is not None:
            raise known
        raise NotFound(f"no entry {shown(key)!r}")

    async def delete(self, key: str) -> bool:
        self._drop(key)
        self._damaged.pop(file_name(key), None)
        try:
            await asyncio.to_thread(self._path(key).unlink)
        except FileNotFoundError:
            return False
        except OSError as e:
            self.on_error()
            raise Unavailable(f"disk store delete failed: {e}") from e
        return True

    async def list_page(self, prefix: str, after: str, limit: int) -> list[tuple[str, EntryMeta]]:
        # Damaged files are never in the index, so they are skipped here by construction.
        return [(k, self._index[k]) for k in self._sorted.page(prefix, after, limit)]

    async def usage(self) -> Usage:
        return Usage(self._bytes, len(self._index), 0)
