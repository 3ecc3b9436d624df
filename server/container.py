"""The codec's container functions as the server uses them, with errors mapped for gRPC.

A damaged container is DATA_LOSS when it was read from the store and INVALID_ARGUMENT when a
client uploaded it; this module is the one place that decides which. It also turns a container
header into the store's :class:`EntryMeta`.
"""

from __future__ import annotations

import hashlib

from kvpack import codec
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


def meta_from_header(
    header: codec.ContainerHeader, blob: bytes, *, settings: dict[str, str] | None = None
) -> EntryMeta:
    """EntryMeta of a container: sizes, dtype, codec name ("mode/entropy"), quant settings plus
    ``settings``, and the sha256 stores verify on read."""
    quant = header.settings.to_dict()
    return EntryMeta(
        stored_bytes=len(blob),
        original_bytes=sum(header.raw_bytes),
        num_layers=header.num_layers,
        dtype=header.dtype,
        codec=f"{quant['mode']}/{quant['entropy']}",
        settings={**quant, **(settings or {})},
        sha256=hashlib.sha256(blob).hexdigest(),
    )
