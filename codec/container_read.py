"""Reading a container's header: every field checked, the section table tiling the data."""

from __future__ import annotations

import json
import math

import numpy as np

from kvpack.codec import huffman, quant
from kvpack.codec.block_meta import META_CODERS
from kvpack.codec.container_format import (
    _PREFIX,
    _STREAM_CODERS,
    MAGIC,
    MAX_ELEMENTS,
    MAX_EXPANSION,
    MAX_HEADER_BYTES,
    MAX_LAYER_NUMBER,
    MAX_LAYERS,
    MAX_SHAPE,
    VERSIONS,
    ContainerHeader,
    LayerEntry,
    SectionRef,
    check_meta,
)
from kvpack.codec.format_error import FormatError
from kvpack.codec.layer_codec import crc32, encoded_tokens
from kvpack.codec.quant_settings import QuantSettings
from kvpack.codec.rawbytes import FLOAT_DTYPES, itemsize


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FormatError(f"header: {what} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _shape(value: object, what: str) -> tuple[int, int, int, int]:
    if not isinstance(value, list) or len(value) != 4:
        raise FormatError(f"header: {what} must be a list of 4 ints")
    b, h, n, d = (_int(v, what, 0, hi) for v, hi in zip(value, MAX_SHAPE, strict=True))
    if b * h * n * d > MAX_ELEMENTS:
        raise FormatError(f"header: {what} {value} exceeds {MAX_ELEMENTS} elements")
    return b, h, n, d


def _ref(value: object, what: str, coders: tuple[str, ...], short_below: int = 0) -> SectionRef:
    """A section record; `short_below` > 0 allows a 5th element, the token count (1 to
    short_below - 1) of a block shorter than the block length."""
    if not isinstance(value, list) or not 4 <= len(value) <= (5 if short_below else 4):
        raise FormatError(f"header: {what} must be [offset, length, crc32, coder]")
    off = _int(value[0], f"{what} offset", 0, 1 << 62)
    length = _int(value[1], f"{what} length", 0, 1 << 62)
    crc = _int(value[2], f"{what} crc32", 0, 0xFFFFFFFF)
    if value[3] not in coders:
        raise FormatError(f"header: {what} coder {value[3]!r} not one of {list(coders)}")
    tokens = _int(value[4], f"{what} tokens", 1, short_below - 1) if len(value) == 5 else None
    return SectionRef(off, length, crc, str(value[3]), tokens)


def _codebook(value: object, what: str, n_levels: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n_levels:
        raise FormatError(f"header: {what} must list {n_levels} code lengths")
    book = tuple(_int(v, what, 0, huffman.MAX_BITS) for v in value)
    try:
        huffman.check_lengths(np.array(book, dtype=np.uint8))
    except huffman.HuffmanError as e:
        raise FormatError(f"header: {what}: {e}") from None
    return book


def _layer_settings(value: object, at: str, base: QuantSettings) -> QuantSettings:
    """A v2 layer's own settings: the container's with the fields its "settings" overrides."""
    if (
        not isinstance(value, dict)
        or not value
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    ):
        raise FormatError(f"header: {at} settings must map names to strings")
    try:
        return QuantSettings.from_mapping({**base.to_dict(), **value})
    except ValueError as err:
        raise FormatError(f"header: {at} settings: {err}") from None


def _entry(value: object, pos: int, base: QuantSettings, dtype: str, version: int) -> LayerEntry:
    if not isinstance(value, dict):
        raise FormatError(f"header: layers[{pos}] must be an object")
    keys = {"layer", "k_shape", "v_shape", "k_codebook", "v_codebook", "indices"}
    keys |= {"k_blocks", "v_blocks", "k_window", "v_window"}
    if version >= 2:
        keys |= {"k_meta", "v_meta"}
    # v2: a layer encoded with other settings than the container's records the fields that differ.
    has_own = version >= 2 and "settings" in value
    if set(value) != keys | ({"settings"} if has_own else set()):
        raise FormatError(
            f"header: layers[{pos}] has fields {sorted(value)}, expected {sorted(keys)}"
        )
    number = _int(value["layer"], f"layers[{pos}].layer", 0, MAX_LAYER_NUMBER - 1)
    at = f"layer {number}"
    settings = _layer_settings(value["settings"], at, base) if has_own else base
    k_shape = _shape(value["k_shape"], f"{at} k_shape")
    v_shape = _shape(value["v_shape"], f"{at} v_shape")
    if k_shape[:3] != v_shape[:3]:
        raise FormatError(f"header: {at} K and V shapes differ in B, H or n")
    lossy = settings.mode == "lossy"
    books = []
    for kind, eb in (("k", settings.k_error_bound), ("v", settings.v_error_bound)):
        book = _codebook(value[f"{kind}_codebook"], f"{at} {kind}_codebook", quant.levels(eb))
        if book is not None and not lossy:
            raise FormatError(f"header: {at} has a codebook in mode {settings.mode!r}")
        books.append(book)
    coders = _STREAM_CODERS[settings.mode]
    blocks = []
    for kind, window, shape in (
        ("k", settings.k_window, k_shape),
        ("v", settings.v_window, v_shape),
    ):
        raw = value[f"{kind}_blocks"]
        t = settings.block_tokens
        whole = encoded_tokens(shape[2], window, t)
        if version < 2 or settings.mode == "lossless":
            if not isinstance(raw, list) or len(raw) != whole // t:
                raise FormatError(f"header: {at} {kind}_blocks must list {whole // t} blocks")
            refs = tuple(
                _ref(r, f"{at} {kind.upper()} block {i}", coders) for i, r in enumerate(raw)
            )
        else:
            # v2 quantised streams: blocks of t tokens, or fewer where a block records its
            # count; together they hold every token older than the window, except fewer than
            # t when append left them in the window.
            most = max(0, shape[2] - window)
            if not isinstance(raw, list) or len(raw) > most:
                raise FormatError(f"header: {at} {kind}_blocks must list at most {most} blocks")
            refs = tuple(
                _ref(r, f"{at} {kind.upper()} block {i}", coders, t) for i, r in enumerate(raw)
            )
            held = sum(t if r.tokens is None else r.tokens for r in refs)
            if not most - t < held <= most:
                raise FormatError(
                    f"header: {at} {kind}_blocks hold {held} tokens, expected "
                    f"{max(0, most - t + 1)} to {most}"
                )
        blocks.append(refs)
    metas: list[SectionRef | None] = [None, None]
    if version >= 2:
        quantised = settings.mode != "lossless"
        for pos_kv, kind in enumerate(("k", "v")):
            raw = value[f"{kind}_meta"]
            if (raw is None) == quantised:
                need = "needs" if quantised else "cannot have"
                raise FormatError(f"header: {at} mode {settings.mode!r} {need} {kind}_meta")
            if raw is not None:
                metas[pos_kv] = _ref(raw, f"{at} {kind.upper()} metadata", META_CODERS)
    indices = value["indices"]
    entry = LayerEntry(
        number,
        k_shape,
        v_shape,
        books[0],
        books[1],
        _ref(indices, f"{at} indices", ("zstd-delta",)) if indices is not None else None,
        blocks[0],
        blocks[1],
        _ref(value["k_window"], f"{at} K window", ("lossless",)),
        _ref(value["v_window"], f"{at} V window", ("lossless",)),
        settings,
        metas[0],
        metas[1],
    )
    raw_bytes = (math.prod(k_shape) + math.prod(v_shape)) * itemsize(dtype)
    if raw_bytes > MAX_EXPANSION * (entry.stored_bytes + 1024):
        raise FormatError(f"header: {at} claims {raw_bytes} bytes from {entry.stored_bytes} stored")
    return entry


def read_header(blob: bytes | bytearray | memoryview) -> ContainerHeader:
    """Parse and check the header (its crc32, every field, the section table tiling the data
    region exactly). Does not read section payloads. FormatError on any problem."""
    view = memoryview(blob)
    if len(view) < _PREFIX.size:
        raise FormatError(f"prefix: {len(view)} bytes, need {_PREFIX.size}")
    magic, version, flags, head_len, head_crc = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise FormatError(f"prefix: bad magic {bytes(magic)!r}, not a kvpack container")
    if version not in VERSIONS:
        raise FormatError(
            f"prefix: unsupported container version {version} (this reads {list(VERSIONS)})"
        )
    if flags != 0:
        raise FormatError(f"prefix: unknown flags {flags:#x}")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(view):
        raise FormatError(f"header: length {head_len} exceeds the blob or {MAX_HEADER_BYTES}")
    head = view[_PREFIX.size : _PREFIX.size + head_len]
    if crc32(head) != head_crc:
        raise FormatError("header: crc32 mismatch")
    try:
        doc = json.loads(bytes(head))
    except (ValueError, RecursionError) as err:
        raise FormatError(f"header: not JSON: {err}") from None
    fields = {"dtype", "settings", "meta", "seq_len", "data_bytes", "layers"}
    if not isinstance(doc, dict) or set(doc) != fields:
        raise FormatError(f"header: expected fields {sorted(fields)}")
    if doc["dtype"] not in FLOAT_DTYPES:
        raise FormatError(f"header: dtype {doc['dtype']!r} not one of {list(FLOAT_DTYPES)}")
    dtype = str(doc["dtype"])
    raw_settings = doc["settings"]
    if not isinstance(raw_settings, dict) or not all(
        isinstance(v, str) for v in raw_settings.values()
    ):
        raise FormatError("header: settings must map names to strings")
    try:
        settings = QuantSettings.from_mapping(raw_settings)
        meta = check_meta(doc["meta"] if isinstance(doc["meta"], dict) else None)
    except ValueError as err:
        raise FormatError(f"header: {err}") from None
    if not isinstance(doc["meta"], dict):
        raise FormatError("header: meta must be an object")
    seq_len = None if doc["seq_len"] is None else _int(doc["seq_len"], "seq_len", 0, 1 << 40)
    data_offset = _PREFIX.size + head_len
    data_bytes = _int(doc["data_bytes"], "data_bytes", 0, 1 << 62)
    if data_offset + data_bytes != len(view):
        raise FormatError(
            f"data: header declares {data_bytes} bytes, blob holds {len(view) - data_offset}"
        )
    raw_layers = doc["layers"]
    if not isinstance(raw_layers, list) or not 1 <= len(raw_layers) <= MAX_LAYERS:
        raise FormatError(f"header: layers must be a list of 1..{MAX_LAYERS} entries")
    entries = tuple(_entry(v, i, settings, dtype, version) for i, v in enumerate(raw_layers))
    cursor = 0
    prev = -1
    for e in entries:
        if e.layer <= prev:
            raise FormatError(f"header: layer {e.layer} out of order or repeated")
        prev = e.layer
        for name, ref in e.named_sections():
            if ref.offset != cursor:
                raise FormatError(
                    f"header: layer {e.layer} {name} at {ref.offset}, expected {cursor}"
                )
            cursor += ref.length
    if cursor != data_bytes:
        raise FormatError(f"header: sections cover {cursor} of {data_bytes} data bytes")
    return ContainerHeader(version, dtype, settings, meta, seq_len, entries, data_offset, len(view))
