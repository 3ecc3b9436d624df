"""The codec's container functions as the server uses them, with errors mapped for gRPC.

A damaged container is DATA_LOSS when it was read from the store and INVALID_ARGUMENT when a
client uploaded it; this module is the one place that decides which. It also turns a container
header into the store's :class:`EntryMeta`.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kvpack import codec
from kvpack.errors import DataLoss, FailedPrecondition, InvalidArgument
from kvpack.server.stores.base import EntryMeta


def _fn(name: str) -> Any:
    fn = getattr(codec, name, None)
    if fn is None:
        raise FailedPrecondition(f"this build's codec has no container support ({name})")
    return fn


def verify_upload(blob: bytes) -> Any:
    """Check every checksum of an uploaded container; returns its header.
    InvalidArgument naming the damage otherwise."""
    try:
        return _fn("verify")(blob)
    except ValueError as e:
        raise InvalidArgument(f"uploaded container is invalid: {e}") from e


def slice_stored(blob: bytes, start: int, end: int) -> bytes:
    """The container restricted to layers [start, end) (a valid container on its own).
    DataLoss when the stored bytes are damaged; InvalidArgument for a bad range."""
    header = read_stored_header(blob)
    layers = _num_layers(header)
    if end == 0:
        end = layers
    if not 0 <= start < end <= layers:
        raise InvalidArgument(
            f"layer range [{start}, {end}) is outside the entry's {layers} layers"
        )
    if start == 0 and end == layers:
        return blob
    try:
        return bytes(_fn("slice_layers")(blob, start, end))
    except ValueError as e:
        raise DataLoss(f"stored entry is damaged: {e}") from e


def read_stored_header(blob: bytes) -> Any:
    """Header of a stored container; DataLoss if it cannot be parsed."""
    try:
        return _fn("read_header")(blob)
    except ValueError as e:
        raise DataLoss(f"stored entry is damaged: {e}") from e


def _num_layers(header: Any) -> int:
    for name in ("num_layers", "layers"):
        value = getattr(header, name, None)
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)):
            return len(value)
    raise FailedPrecondition("codec container header has no layer count")


def meta_from_header(
    header: Any, blob: bytes, *, settings: dict[str, str] | None = None
) -> EntryMeta:
    """EntryMeta of a container (sizes, dtype, codec name, settings, sha256)."""
    quant = getattr(header, "settings", None) or getattr(header, "quant", None)
    quant_dict: dict[str, str] = {}
    if quant is not None and hasattr(quant, "to_dict"):
        quant_dict = {str(k): str(v) for k, v in quant.to_dict().items()}
    mode = quant_dict.get("mode", "")
    entropy = quant_dict.get("entropy", "")
    dtype = getattr(header, "dtype", "")
    return EntryMeta(
        stored_bytes=len(blob),
        original_bytes=int(getattr(header, "original_bytes", 0) or 0),
        num_layers=_num_layers(header),
        dtype=str(dtype).removeprefix("torch."),
        codec=f"{mode}/{entropy}" if mode else "",
        settings={**quant_dict, **(settings or {})},
        sha256=hashlib.sha256(blob).hexdigest(),
    )
