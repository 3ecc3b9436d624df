"""Writing containers: assemble encoded layers, or encode a whole cache (docs/FORMAT.md)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from kvpack.codec.container_format import (
    _PREFIX,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_LAYERS,
    VERSION,
    check_meta,
)
from kvpack.codec.layer_codec import EncodedLayer, Section, crc32, encode_layer
from kvpack.codec.quant_settings import QuantSettings
from kvpack.codec.rawbytes import dtype_name


def write(
    dtype: str,
    settings: QuantSettings,
    meta: Mapping[str, str] | None,
    seq_len: int | None,
    layers: Sequence[tuple[int, EncodedLayer]],
) -> bytes:
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 0):
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    entries = []
    parts: list[bytes] = []
    cursor = 0

    def place(sec: Section) -> list[object]:
        nonlocal cursor
        ref = [cursor, len(sec.data), sec.crc, sec.coder]
        parts.append(sec.data)
        cursor += len(sec.data)
        return ref

    for number, lay in layers:
        if lay.dtype != dtype or lay.settings != settings:
            raise ValueError(f"layer {number} was encoded with another dtype or settings")
        entry: dict[str, object] = {
            "layer": number,
            "k_shape": list(lay.k_shape),
            "v_shape": list(lay.v_shape),
            "k_codebook": list(lay.k_codebook) if lay.k_codebook is not None else None,
            "v_codebook": list(lay.v_codebook) if lay.v_codebook is not None else None,
        }
        entry["indices"] = place(lay.indices) if lay.indices is not None else None
        entry["k_blocks"] = [place(s) for s in lay.k_blocks]
        entry["v_blocks"] = [place(s) for s in lay.v_blocks]
        entry["k_window"] = place(lay.k_window)
        entry["v_window"] = place(lay.v_window)
        entries.append(entry)
    header = {
        "dtype": dtype,
        "settings": settings.to_dict(),
        "meta": check_meta(meta),
        "seq_len": seq_len,
        "data_bytes": cursor,
        "layers": entries,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    prefix = _PREFIX.pack(MAGIC, VERSION, 0, len(head), crc32(head))
    return b"".join([prefix, head, *parts])


def assemble(
    layers: Sequence[EncodedLayer],
    settings: QuantSettings,
    *,
    dtype: str | torch.dtype,
    meta: Mapping[str, str] | None = None,
    seq_len: int | None = None,
) -> bytes:
    """A container of layers numbered 0..L-1 from encode_layer results (all with `settings` and
    `dtype`). meta: small str -> str map; seq_len: context length before eviction."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if len(layers) > MAX_LAYERS:
        raise ValueError(f"{len(layers)} layers exceed {MAX_LAYERS}")
    return write(name, settings, meta, seq_len, list(enumerate(layers)))


def encode(
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    indices: Sequence[torch.Tensor | None] | None = None,
    settings: QuantSettings = QuantSettings(),  # noqa: B008 (frozen, immutable)
    meta: Mapping[str, str] | None = None,
    seq_len: int | None = None,
) -> bytes:
    """Encode a cache: per-layer keys/values [B, H, n_l, d] (n_l may differ per layer), optional
    per-layer kept positions [B, H, n_l] int64. Returns container bytes."""
    if len(keys) != len(values) or (indices is not None and len(indices) != len(keys)):
        raise ValueError("keys, values and indices must have one entry per layer")
    if not keys:
        raise ValueError("a container needs at least one layer")
    idx = list(indices) if indices is not None else [None] * len(keys)
    encoded = [encode_layer(k, v, i, settings) for k, v, i in zip(keys, values, idx, strict=True)]
    return assemble(encoded, settings, dtype=keys[0].dtype, meta=meta, seq_len=seq_len)
