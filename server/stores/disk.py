"""Disk store: one file per entry in a directory; survives restarts.

File layout (little-endian): ``b"KVPE1\\n"`` magic, u32 header length, header JSON
``{"key": full key, "meta": EntryMeta incl. the container's sha256}``, then the container bytes.
Writes go to a temporary file in the same directory, are fsynced, then ``os.replace``d into
place (and the directory fsynced), so a reader sees either the old entry or the whole new one.
Reads verify the sha256; a mismatch or a truncated file is DATA_LOSS.

File names are ``sha256(key).hex() + ".kvpe"``: safe for any key, fixed length (keys up to 200
characters plus a tenant would not fit 255-byte names once escaped). The key -> metadata index is
rebuilt from the files' headers on open. One server process per directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from kvpack.errors import DataLoss, NotFound, Unavailable
from kvpack.server.stores.base import Entry, EntryMeta, Store, Usage

MAGIC = b"KVPE1\n"
SUFFIX = ".kvpe"


def file_name(key: str) -> str:
    """The entry file name of ``key``."""
    return hashlib.sha256(key.encode()).hexdigest() + SUFFIX


class DiskStore(Store):
    """Entries as files under ``root`` (created if missing)."""

    name = "disk"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = Path(root)
        self._index: dict[str, EntryMeta] = {}

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"disk store directory {self.root} is not usable: {e}") from e
        for path in self.root.glob("*" + SUFFIX):
            try:
                with path.open("rb") as f:
                    key, meta, _ = self._read_header(f, path)
                self._index[key] = meta
            except (DataLoss, OSError):
                # Listed entries must be readable; a damaged file is reported when fetched by
                # key, and left in place for inspection.
                self.on_error()
        for stale in self.root.glob(".tmp-*"):
            stale.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / file_name(key)

    @staticmethod
    def _read_header(f: object, path: Path) -> tuple[str, EntryMeta, int]:
        read = f.read  # type: ignore[attr-defined]
        head = read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
            raise DataLoss(f"entry file {path.name} is not a kvpack entry (bad magic)")
        (meta_len,) = struct.unpack("<I", head[len(MAGIC) :])
        raw = read(meta_len)
        if len(raw) != meta_len:
            raise DataLoss(f"entry file {path.name} is truncated in its metadata")
        try:
            doc = json.loads(raw)
            key, meta = str(doc["key"]), EntryMeta.from_json(json.dumps(doc["meta"]))
        except (ValueError, KeyError, TypeError) as e:
            raise DataLoss(f"entry file {path.name} has a damaged header: {e}") from e
        return key, meta, len(head) + meta_len

    async def put(self, key: str, data: bytes, meta: EntryMeta) -> None:
        if not meta.sha256:
            meta = dataclasses.replace(meta, sha256=hashlib.sha256(data).hexdigest())
        try:
            await asyncio.to_thread(self._write, key, data, meta)
        except OSError as e:
            self.on_error()
            raise Unavailable(f"disk store write failed: {e}") from e
        self._index[key] = meta

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
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    async def get(self, key: str) -> Entry:
        try:
            entry = await asyncio.to_thread(self._read, key)
        except FileNotFoundError:
            self._index.pop(key, None)
            raise NotFound(f"no entry {key.split('/', 1)[-1]!r}") from None
        except DataLoss:
            self.on_error()
            raise
        except OSError as e:
            self.on_error()
            raise Unavailable(f"disk store read failed: {e}") from e
        return entry

    def _read(self, key: str) -> Entry:
        path = self._path(key)
        with path.open("rb") as f:
            stored_key, meta, _ = self._read_header(f, path)
            data = f.read()
        if stored_key != key:
            raise DataLoss(f"entry file {path.name} holds a different key")
        if len(data) != meta.stored_bytes or hashlib.sha256(data).hexdigest() != meta.sha256:
            raise DataLoss(
                f"stored entry {key.split('/', 1)[-1]!r} is damaged (checksum mismatch on disk)"
            )
        return Entry(data, meta)

    async def stat(self, key: str) -> EntryMeta:
        meta = self._index.get(key)
        if meta is None:
            raise NotFound(f"no entry {key.split('/', 1)[-1]!r}")
        return meta

    async def delete(self, key: str) -> bool:
        self._index.pop(key, None)
        try:
            await asyncio.to_thread(self._path(key).unlink)
        except FileNotFoundError:
            return False
        except OSError as e:
            self.on_error()
            raise Unavailable(f"disk store delete failed: {e}") from e
        return True

    async def list(self, prefix: str) -> list[tuple[str, EntryMeta]]:
        return sorted(
            ((k, m) for k, m in self._index.items() if k.startswith(prefix)),
            key=lambda item: item[0],
        )

    async def usage(self) -> Usage:
        return Usage(sum(m.stored_bytes for m in self._index.values()), len(self._index), 0)
