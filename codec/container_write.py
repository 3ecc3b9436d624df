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
    VERSIONS,
    check_meta,
)
from kvpack.codec.container_read import CODER_LETTERS
from kvpack.codec.layer_codec import EncodedLayer, Section, crc32, encode_layer
from kvpack.codec.quant_settings import QuantSettings
from kvpack.codec.rawbytes import dtype_name


def write(
    dtype: str,
    settings: QuantSettings,
    meta: Mapping[str, str] | None,
    seq_len: int | None,
    layers: Sequence[tuple[int, EncodedLayer]],
    version: int = VERSION,
) -> bytes:
    """A container of `version` holding `layers` (absolute number, encoded layer laid out for
    that version). In v2 a layer's settings may differ from `settings` (the container's): the
    fields that differ are recorded in its entry; v1 has no room for that."""
    if version not in VERSIONS:
        raise ValueError(f"container version {version} not one of {list(VERSIONS)}")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 0):
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    entries = []
    parts: list[bytes] = []
    cursor = 0

    def place(sec: Section) -> list[object]:
        """The section's record: v1 [offset, length, crc32, coder]; v2 [length, crc32, coder]
        (offsets implied by order)."""
        nonlocal cursor
        ref: list[object] = [len(sec.data), sec.crc, sec.coder]
        parts.append(sec.data)
        cursor += len(sec.data)
        return [cursor - len(sec.data), *ref] if version < 2 else ref

    def table(blocks: Sequence[Section]) -> object:
        """v1: a list of records; v2: a block table (lengths, crc32s, one coder letter per
        block, and the token counts of short blocks)."""
        if version < 2:
            return [place(b) for b in blocks]
        for b in blocks:
            parts.append(b.data)
        nonlocal cursor
        cursor += sum(len(b.data) for b in blocks)
        out: dict[str, object] = {
            "lengths": [len(b.data) for b in blocks],
            "crcs": [b.crc for b in blocks],
            "coders": "".join(CODER_LETTERS[b.coder] for b in blocks),
        }
        short = [[i, b.tokens] for i, b in enumerate(blocks) if b.tokens is not None]
        if short:
            out["short"] = short
        return out

    base = settings.to_dict()
    for number, lay in layers:
        if lay.dtype != dtype or lay.version != version:
            raise ValueError(f"layer {number} was encoded for another dtype or container version")
        own = {k: v for k, v in lay.settings.to_dict().items() if base[k] != v}
        if own and version < 2:
            raise ValueError(f"layer {number} was encoded with other settings (v1 has one set)")
        entry: dict[str, object] = {
            "layer": number,
            "k_shape": list(lay.k_shape),
            "v_shape": list(lay.v_shape),
            "k_codebook": list(lay.k_codebook) if lay.k_codebook is not None else None,
            "v_codebook": list(lay.v_codebook) if lay.v_codebook is not None else None,
        }
        if (lay.k_meta is None) != (version < 2 or lay.settings.mode == "lossless"):
            raise ValueError(f"layer {number}: group metadata sections do not match its format")
        entry["indices"] = place(lay.indices) if lay.indices is not None else None
        if version >= 2:
            entry["k_meta"] = place(lay.k_meta) if lay.k_meta is not None else None
        entry["k_blocks"] = table(lay.k_blocks)
        if version >= 2:
            entry["v_meta"] = place(lay.v_meta) if lay.v_meta is not None else None
        entry["v_blocks"] = table(lay.v_blocks)
        entry["k_window"] = place(lay.k_window)
        entry["v_window"] = place(lay.v_window)
        if own:
            entry["settings"] = own
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
    prefix = _PREFIX.pack(MAGIC, version, 0, len(head), crc32(head))
    return b"".join([prefix, head, *parts])


def assemble(
    layers: Sequence[EncodedLayer],
    settings: QuantSettings,
    *,
    dtype: str | torch.dtype,
    meta: Mapping[str, str] | None = None,
    seq_len: int | None = None,
) -> bytes:
    """A container of layers numbered 0..L-1 from encode_layer results (all of `dtype`; each
    with `settings`, the container's, or its own: error bounds chosen per layer are recorded per
    layer). meta: small str -> str map; seq_len: context length before eviction."""
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
    layer_settings: Sequence[QuantSettings] | None = None,
) -> bytes:
    """Encode a cache: per-layer keys/values [B, H, n_l, d] (n_l may differ per layer), optional
    per-layer kept positions [B, H, n_l] int64. Returns container bytes.

    layer_settings: one QuantSettings per layer (e.g. per-layer error bounds chosen for a byte
    budget); the container records `settings` and each layer's differences from it, and
    decode reads them back. None: every layer uses `settings`."""
    if len(keys) != len(values) or (indices is not None and len(indices) != len(keys)):
        raise ValueError("keys, values and indices must have one entry per layer")
    if layer_settings is not None and len(layer_settings) != len(keys):
        raise ValueError(f"layer_settings has {len(layer_settings)} entries for {len(keys)} layers")
    if not keys:
        raise ValueError("a container needs at least one layer")
    idx = list(indices) if indices is not None else [None] * len(keys)
    own = list(layer_settings) if layer_settings is not None else [settings] * len(keys)
    encoded = [encode_layer(k, v, i, s) for k, v, i, s in zip(keys, values, idx, own, strict=True)]
    return assemble(encoded, settings, dtype=keys[0].dtype, meta=meta, seq_len=seq_len)
