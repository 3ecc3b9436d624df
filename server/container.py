"""The codec's container functions as the server uses them, with errors mapped for gRPC.

A damaged container is DATA_LOSS when it was read from the store and INVALID_ARGUMENT when a
client uploaded it; this module is the one place that decides which. It also turns a container
header into the store's :class:`EntryMeta`.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from typing import BinaryIO

from kvpack import codec
from kvpack.engine import codec_name, entry_settings
from kvpack.errors import DataLoss, InvalidArgument
from kvpack.server.stores.base import EntryMeta


def verify_upload(blob: bytes) -> codec.ContainerHeader:
    """Check every checksum of an uploaded container; returns its header.
    InvalidArgument naming the damage otherwise."""
    try:
        return codec.verify(blob)
    except ValueError as e:
        raise InvalidArgument(f"uploaded container is invalid: {e}") from e


def read_stored_header(blob: bytes) -> codec.ContainerHeader:
    """Header of a stored container; DataLoss if it cannot be parsed."""
    try:
        return codec.read_header(blob)
    except ValueError as e:
        raise DataLoss(f"stored entry is damaged: {e}") from e


def slice_stored(blob: bytes, start: int, end: int) -> bytes:
    """The container restricted to layers [start, end) (``end`` 0 = to the last), itself a valid
    container. DataLoss when the stored bytes are damaged; InvalidArgument for a range that
    selects no layer."""
    header = read_stored_header(blob)
    numbers = header.layers  # absolute layer numbers (a stored slice keeps its numbering)
    end = end or (max(numbers) + 1)
    if not any(start <= n < end for n in numbers):
        raise InvalidArgument(
            f"layer range [{start}, {end}) selects none of the entry's layers "
            f"{numbers[0]}..{numbers[-1]}"
        )
    if all(start <= n < end for n in numbers):
        return blob
    try:
        return codec.slice_layers(blob, start, end)
    except ValueError as e:
        raise DataLoss(f"stored entry is damaged: {e}") from e


def verified_meta(blob: bytes) -> EntryMeta:
    """:func:`verify_upload` then :func:`meta_from_header`: one call for the codec pool."""
    return meta_from_header(verify_upload(blob), blob)


def meta_from_header(
    header: codec.ContainerHeader,
    blob: bytes,
    *,
    settings: dict[str, str] | None = None,
    sha256: str = "",
) -> EntryMeta:
    """EntryMeta of a container: sizes, dtype, codec name ("mode/entropy"), its settings
    (``settings`` as the engine computed them for a Compress, else the container's quant
    settings: engine.entry_settings) and the sha256 stores verify on read (``sha256`` when the
    caller already has the digest, else computed here)."""
    return EntryMeta(
        stored_bytes=len(blob),
        original_bytes=sum(header.raw_bytes),
        num_layers=header.num_layers,
        dtype=header.dtype,
        codec=codec_name(header.settings),
        settings=entry_settings(header.settings) if settings is None else dict(settings),
        sha256=sha256 or hashlib.sha256(blob).hexdigest(),
    )


def read_file_header(f: BinaryIO, offset: int) -> codec.ContainerHeader:
    """Header of the container stored in ``f`` from byte ``offset`` to the end of the file,
    reading only the container's prefix and JSON header, not its data region.

    :func:`codec.read_header` needs the whole container as a buffer (it checks that the section
    table tiles the data region exactly, i.e. the container's length), but touches only the first
    bytes; the file is memory-mapped so the pages it never touches are never read. The file must
    not shrink while mapped (stores replace entry files, never truncate them). DataLoss if the
    header is damaged.
    """
    if os.fstat(f.fileno()).st_size <= offset:
        raise DataLoss("the container is missing (nothing after the metadata)")
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mapped)
    problem = ""
    try:
        return codec.read_header(view[offset:])
    except ValueError as e:
        problem = str(e)
    finally:
        view.release()
        # A view still alive in a traceback would make close() raise: then it closes when freed.
        with contextlib.suppress(BufferError):
            mapped.close()
    raise DataLoss(f"the container is damaged: {problem}")


def meta_mismatches(meta: EntryMeta, header: codec.ContainerHeader, stored_bytes: int) -> list[str]:
    """What ``meta`` says about its container that the container's own (checked) header does not:
    ``"name (meta value vs container value)"`` per field; empty when they agree. ``stored_bytes``:
    the container's length in bytes. The sha256 is not among them: it needs every byte, and the
    store checks it on read."""
    quant = header.settings.to_dict()
    expected: dict[str, object] = {
        "stored_bytes": stored_bytes,
        "original_bytes": sum(header.raw_bytes),
        "num_layers": header.num_layers,
        "dtype": header.dtype,
        "codec": codec_name(header.settings),
    }
    out = [
        f"{name} ({getattr(meta, name)!r} vs {value!r})"
        for name, value in expected.items()
        if getattr(meta, name) != value
    ]
    # Settings also carry the server's own entries (policy.*): only the container's are checked.
    wrong = sorted(k for k, v in quant.items() if meta.settings.get(k) != v)
    if wrong:
        out.append(f"settings ({', '.join(wrong)})")
    return out
