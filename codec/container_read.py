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


def _ref(value: object, what: str, coders: tuple[str, ...]) -> SectionRef:
    """A v1 section record [offset, length, crc32, coder]."""
    if not isinstance(value, list) or len(value) != 4:
        raise FormatError(f"header: {what} must be [offset, length, crc32, coder]")
    off = _int(value[0], f"{what} offset", 0, 1 << 62)
    length = _int(value[1], f"{what} length", 0, 1 << 62)
    crc = _int(value[2], f"{what} crc32", 0, 0xFFFFFFFF)
    if value[3] not in coders:
        raise FormatError(f"header: {what} coder {value[3]!r} not one of {list(coders)}")
    return SectionRef(off, length, crc, str(value[3]))


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


# v2 block tables name each block's coder with one letter.
CODER_LETTERS = {"huffman": "h", "zstd": "z", "fixed": "f", "lossless": "l"}
_LETTER_CODERS = {v: k for k, v in CODER_LETTERS.items()}


def _ints(value: object, what: str, hi: int) -> np.ndarray:
    """A JSON list of ints in [0, hi] as int64, checked in bulk."""
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise FormatError(f"header: {what} must be a list of ints")
    try:
        arr = np.array(value, dtype=np.int64)
    except OverflowError:
        raise FormatError(f"header: {what} out of range") from None
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > hi):
        raise FormatError(f"header: {what} must lie in [0, {hi}]")
    return arr


class _Tiler:
    """Assigns v2 sections their offsets: they tile the data region in header order."""

    def __init__(self, start: int) -> None:
        self.cursor = start

    def record(self, value: object, what: str, coders: tuple[str, ...]) -> SectionRef:
        """A v2 section record [length, crc32, coder]."""
        if not isinstance(value, list) or len(value) != 3:
            raise FormatError(f"header: {what} must be [length, crc32, coder]")
        length = _int(value[0], f"{what} length", 0, 1 << 62)
        crc = _int(value[1], f"{what} crc32", 0, 0xFFFFFFFF)
        if value[2] not in coders:
            raise FormatError(f"header: {what} coder {value[2]!r} not one of {list(coders)}")
        ref = SectionRef(self.cursor, length, crc, str(value[2]))
        self.cursor += length
        return ref

    def blocks(
        self, value: object, what: str, coders: tuple[str, ...], short_below: int
    ) -> tuple[SectionRef, ...]:
        """A v2 block table {"lengths": [...], "crcs": [...], "coders": "hz..."} (+ "short":
        [[index, tokens], ...] where short_below > 0), parsed in bulk."""
        fields = {"lengths", "crcs", "coders"}
        if not isinstance(value, dict) or not fields <= set(value) <= fields | {"short"}:
            raise FormatError(f"header: {what} must be an object with {sorted(fields)}")
        lengths = _ints(value["lengths"], f"{what} lengths", 1 << 62)
        crcs = _ints(value["crcs"], f"{what} crcs", 0xFFFFFFFF)
        letters = value["coders"]
        if not isinstance(letters, str) or not len(letters) == len(lengths) == len(crcs):
            raise FormatError(f"header: {what} lengths, crcs and coders differ in length")
        allowed = {CODER_LETTERS[c] for c in coders}
        if not set(letters) <= allowed:
            raise FormatError(f"header: {what} coders {letters!r} not all in {sorted(allowed)}")
        tokens: list[int | None] = [None] * len(lengths)
        if "short" in value:
            short = value["short"]
            if not short_below or not isinstance(short, list) or not short:
                raise FormatError(f"header: {what} short must list [block, tokens] pairs")
            prev = -1
            for item in short:
                if not isinstance(item, list) or len(item) != 2:
                    raise FormatError(f"header: {what} short must list [block, tokens] pairs")
                i = _int(item[0], f"{what} short block", prev + 1, len(lengths) - 1)
                tokens[i] = _int(item[1], f"{what} short tokens", 1, short_below - 1)
                prev = i
        offsets = (self.cursor + np.cumsum(lengths) - lengths).tolist()
        self.cursor += int(lengths.sum())
        names = [_LETTER_CODERS[c] for c in letters]
        return tuple(
            SectionRef(o, n, c, name, tk)
            for o, n, c, name, tk in zip(
                offsets, lengths.tolist(), crcs.tolist(), names, tokens, strict=True
            )
        )


def _entry(
    value: object, pos: int, base: QuantSettings, dtype: str, version: int, tiler: _Tiler
) -> LayerEntry:
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
    quantised = settings.mode != "lossless"
    t = settings.block_tokens
    indices = value["indices"]
    if version < 2:
        idx = _ref(indices, f"{at} indices", ("zstd-delta",)) if indices is not None else None
        blocks = [
            tuple(
                _ref(r, f"{at} {kind.upper()} block {i}", coders)
                for i, r in enumerate(_list(value[f"{kind}_blocks"], f"{at} {kind}_blocks"))
            )
            for kind in ("k", "v")
        ]
        metas: list[SectionRef | None] = [None, None]
        windows = [
            _ref(value[f"{kind}_window"], f"{at} {kind.upper()} window", ("lossless",))
            for kind in ("k", "v")
        ]
    else:
        # v2: sections in container order, offsets implied; blocks as bulk tables.
        idx = (
            tiler.record(indices, f"{at} indices", ("zstd-delta",)) if indices is not None else None
        )
        blocks, metas = [], []
        for kind in ("k", "v"):
            raw = value[f"{kind}_meta"]
            if (raw is None) == quantised:
                need = "needs" if quantised else "cannot have"
                raise FormatError(f"header: {at} mode {settings.mode!r} {need} {kind}_meta")
            what = f"{at} {kind.upper()} metadata"
            metas.append(tiler.record(raw, what, META_CODERS) if raw is not None else None)
            what = f"{at} {kind}_blocks"
            blocks.append(
                tiler.blocks(value[f"{kind}_blocks"], what, coders, t if quantised else 0)
            )
        windows = [
            tiler.record(value[f"{kind}_window"], f"{at} {kind.upper()} window", ("lossless",))
            for kind in ("k", "v")
        ]
    for kind, window, shape, refs in (
        ("k", settings.k_window, k_shape, blocks[0]),
        ("v", settings.v_window, v_shape, blocks[1]),
    ):
        whole = encoded_tokens(shape[2], window, t)
        if version < 2 or not quantised:
            if len(refs) != whole // t:
                raise FormatError(f"header: {at} {kind}_blocks must list {whole // t} blocks")
        else:
            # v2 quantised streams: blocks of t tokens, or fewer where the table says so;
            # together they hold every token older than the window, except fewer than t when
            # append left them in the window.
            most = max(0, shape[2] - window)
            held = sum(t if r.tokens is None else r.tokens for r in refs)
            if not most - t < held <= most:
                raise FormatError(
                    f"header: {at} {kind}_blocks hold {held} tokens, expected "
                    f"{max(0, most - t + 1)} to {most}"
                )
    entry = LayerEntry(
        number,
        k_shape,
        v_shape,
        books[0],
        books[1],
        idx,
        blocks[0],
        blocks[1],
        windows[0],
        windows[1],
        settings,
        metas[0],
        metas[1],
    )
    raw_bytes = (math.prod(k_shape) + math.prod(v_shape)) * itemsize(dtype)
    if raw_bytes > MAX_EXPANSION * (entry.stored_bytes + 1024):
        raise FormatError(f"header: {at} claims {raw_bytes} bytes from {entry.stored_bytes} stored")
    return entry


def _list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise FormatError(f"header: {what} must be a list")
    return value


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
    tiler = _Tiler(0)
    entries = tuple(_entry(v, i, settings, dtype, version, tiler) for i, v in enumerate(raw_layers))
    cursor = tiler.cursor  # v2: offsets implied by order
    prev = -1
    for e in entries:
        if e.layer <= prev:
            raise FormatError(f"header: layer {e.layer} out of order or repeated")
        prev = e.layer
        if version >= 2:
            continue
        for name, ref in e.named_sections():
            if ref.offset != cursor:
                raise FormatError(
                    f"header: layer {e.layer} {name} at {ref.offset}, expected {cursor}"
                )
            cursor += ref.length
    if cursor != data_bytes:
        raise FormatError(f"header: sections cover {cursor} of {data_bytes} data bytes")
    return ContainerHeader(version, dtype, settings, meta, seq_len, entries, data_offset, len(view))
