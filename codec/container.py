"""The kvpack container: versioned, pickle-free, little-endian; see docs/FORMAT.md.

Layout: a 16-byte prefix (magic, version, flags, header length, header crc32), a JSON header
(dtype, settings, meta, seq_len, per-layer shapes, codebooks and section table) and a data region
of sections, each with its own crc32. Any layer decodes from its own sections alone.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kvpack.codec import huffman, lossless, quant
from kvpack.codec.format_error import FormatError
from kvpack.codec.layer_codec import (
    EncodedLayer,
    Section,
    check_block,
    decode_indices,
    decode_stream,
    encode_indices,
    encode_layer,
    encode_stream,
    encoded_tokens,
)
from kvpack.codec.quant_settings import QuantSettings
from kvpack.codec.rawbytes import FLOAT_DTYPES, dtype_name, itemsize

MAGIC = b"KVPK"
VERSION = 1
CONTAINER_VERSION = VERSION  # the name kvpack.codec exports
_PREFIX = struct.Struct("<4sHHII")  # magic, version, flags (0), header bytes, header crc32
MAX_HEADER_BYTES = 16 << 20
MAX_LAYERS = 4096
MAX_LAYER_NUMBER = 1 << 16
# Sane maxima for [B, H, n, d]; each tensor also stays under MAX_ELEMENTS.
MAX_SHAPE = (1 << 16, 1 << 12, 1 << 24, 1 << 16)
MAX_ELEMENTS = 1 << 34
# A layer may not claim more decoded bytes than this many times its stored bytes (+ 64 KiB):
# zstd cannot exceed about 2^15, and quantised blocks carry >= 8 bytes per group.
MAX_EXPANSION = 1 << 16
MAX_META_ITEMS = 64
MAX_META_CHARS = 4096
_STREAM_CODERS = {"lossy": ("huffman", "zstd"), "fixed": ("fixed",), "lossless": ("lossless",)}


@dataclass(frozen=True)
class SectionRef:
    """Where a section lives: offset from the start of the data region, length, crc32, coder."""

    offset: int
    length: int
    crc: int
    coder: str

    def to_json(self) -> list[object]:
        return [self.offset, self.length, self.crc, self.coder]


@dataclass(frozen=True)
class LayerEntry:
    """One layer in the header: number, shapes [B, H, n, d], codebooks (Huffman code lengths per
    symbol, or None) and its sections."""

    layer: int
    k_shape: tuple[int, int, int, int]
    v_shape: tuple[int, int, int, int]
    k_codebook: tuple[int, ...] | None
    v_codebook: tuple[int, ...] | None
    indices: SectionRef | None
    k_blocks: tuple[SectionRef, ...]
    v_blocks: tuple[SectionRef, ...]
    k_window: SectionRef
    v_window: SectionRef

    def named_sections(self) -> list[tuple[str, SectionRef]]:
        """(name for error messages, ref) in container order."""
        out = [("indices", self.indices)] if self.indices is not None else []
        out += [(f"K block {i}", r) for i, r in enumerate(self.k_blocks)]
        out += [(f"V block {i}", r) for i, r in enumerate(self.v_blocks)]
        return [*out, ("K window", self.k_window), ("V window", self.v_window)]

    @property
    def stored_bytes(self) -> int:
        return sum(r.length for _, r in self.named_sections())


@dataclass(frozen=True)
class ContainerHeader:
    """Everything in a container except the tensor payloads.

    raw_bytes / stored_bytes are per layer: K+V bytes in `dtype` and the bytes of its sections.
    coders: per layer, the coder of each K and V block ({"k": (...), "v": (...)}).
    """

    version: int
    dtype: str
    settings: QuantSettings
    meta: dict[str, str]
    seq_len: int | None
    entries: tuple[LayerEntry, ...]
    data_offset: int
    total_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.entries)

    @property
    def layers(self) -> list[int]:
        return [e.layer for e in self.entries]

    @property
    def k_shapes(self) -> list[tuple[int, int, int, int]]:
        return [e.k_shape for e in self.entries]

    @property
    def v_shapes(self) -> list[tuple[int, int, int, int]]:
        return [e.v_shape for e in self.entries]

    @property
    def raw_bytes(self) -> list[int]:
        size = itemsize(self.dtype)
        return [(math.prod(e.k_shape) + math.prod(e.v_shape)) * size for e in self.entries]

    @property
    def stored_bytes(self) -> list[int]:
        return [e.stored_bytes for e in self.entries]

    @property
    def coders(self) -> list[dict[str, tuple[str, ...]]]:
        return [
            {"k": tuple(r.coder for r in e.k_blocks), "v": tuple(r.coder for r in e.v_blocks)}
            for e in self.entries
        ]


@dataclass(frozen=True)
class DecodedCache:
    """Decoded layers: keys/values [B, H, n_l, d] in the container dtype, indices [B, H, n_l]
    int64 or None, absolute layer numbers, and the header."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    indices: list[torch.Tensor | None]
    layers: list[int]
    header: ContainerHeader = field(repr=False)


# ---------------------------------------------------------------------------------------- writing


def _check_meta(meta: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(meta or {})
    if len(meta) > MAX_META_ITEMS:
        raise ValueError(f"meta has {len(meta)} items, at most {MAX_META_ITEMS}")
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"meta must map str to str, got {k!r}: {v!r}")
        if len(k) > MAX_META_CHARS or len(v) > MAX_META_CHARS:
            raise ValueError(f"meta item {k[:40]!r} longer than {MAX_META_CHARS} characters")
    return meta


def _write(
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
        "meta": _check_meta(meta),
        "seq_len": seq_len,
        "data_bytes": cursor,
        "layers": entries,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    prefix = _PREFIX.pack(MAGIC, VERSION, 0, len(head), zlib.crc32(head))
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
    return _write(name, settings, meta, seq_len, list(enumerate(layers)))


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


# ---------------------------------------------------------------------------------------- reading


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


def _entry(value: object, pos: int, settings: QuantSettings, dtype: str) -> LayerEntry:
    if not isinstance(value, dict):
        raise FormatError(f"header: layers[{pos}] must be an object")
    keys = {"layer", "k_shape", "v_shape", "k_codebook", "v_codebook", "indices"}
    keys |= {"k_blocks", "v_blocks", "k_window", "v_window"}
    if set(value) != keys:
        raise FormatError(
            f"header: layers[{pos}] has fields {sorted(value)}, expected {sorted(keys)}"
        )
    number = _int(value["layer"], f"layers[{pos}].layer", 0, MAX_LAYER_NUMBER - 1)
    at = f"layer {number}"
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
        nb = encoded_tokens(shape[2], window, settings.block_tokens) // settings.block_tokens
        if not isinstance(raw, list) or len(raw) != nb:
            raise FormatError(f"header: {at} {kind}_blocks must list {nb} blocks")
        blocks.append(
            tuple(_ref(r, f"{at} {kind.upper()} block {i}", coders) for i, r in enumerate(raw))
        )
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
    if version != VERSION:
        raise FormatError(f"prefix: unsupported container version {version} (this reads {VERSION})")
    if flags != 0:
        raise FormatError(f"prefix: unknown flags {flags:#x}")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(view):
        raise FormatError(f"header: length {head_len} exceeds the blob or {MAX_HEADER_BYTES}")
    head = view[_PREFIX.size : _PREFIX.size + head_len]
    if zlib.crc32(head) != head_crc:
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
        meta = _check_meta(doc["meta"] if isinstance(doc["meta"], dict) else None)
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
    entries = tuple(_entry(v, i, settings, dtype) for i, v in enumerate(raw_layers))
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
    return ContainerHeader(VERSION, dtype, settings, meta, seq_len, entries, data_offset, len(view))


def _payload(
    view: memoryview, header: ContainerHeader, layer: int, name: str, ref: SectionRef
) -> memoryview:
    start = header.data_offset + ref.offset
    data = view[start : start + ref.length]
    if zlib.crc32(data) != ref.crc:
        raise FormatError(f"layer {layer} {name}: crc32 mismatch")
    return data


def _check_entry(view: memoryview, header: ContainerHeader, e: LayerEntry) -> dict[str, memoryview]:
    """Checksums and structure of every section of one layer (no tensor decoding); returns the
    checked payloads by section name."""
    s = header.settings
    payloads: dict[str, memoryview] = {}
    for name, ref in e.named_sections():
        data = payloads[name] = _payload(view, header, e.layer, name, ref)
        try:
            if name.startswith(("K block", "V block")):
                kind = name[0].lower()
                shape = e.k_shape if kind == "k" else e.v_shape
                book = e.k_codebook if kind == "k" else e.v_codebook
                check_block(kind, (ref.coder, data), shape, header.dtype, s, book)
            elif name == "indices":
                lossless.check_frame(data, 8 * math.prod(e.k_shape[:3]))
            else:
                shape = e.k_shape if name[0] == "K" else e.v_shape
                window = s.k_window if name[0] == "K" else s.v_window
                n_tail = shape[2] - encoded_tokens(shape[2], window, s.block_tokens)
                size = itemsize(header.dtype)
                lossless.check_frame(data, shape[0] * shape[1] * n_tail * shape[3] * size)
        except FormatError:
            raise
        except ValueError as err:
            raise FormatError(f"layer {e.layer} {name}: {err}") from None
    return payloads


def verify(blob: bytes | bytearray | memoryview) -> ContainerHeader:
    """Check everything short of decoding tensors: header, every section's crc32, block metadata,
    framing of every payload. Returns the header; FormatError naming the section otherwise."""
    header = read_header(blob)
    view = memoryview(blob)
    for e in header.entries:
        _check_entry(view, header, e)
    return header


def _select(header: ContainerHeader, layers: Sequence[int] | None) -> list[LayerEntry]:
    if layers is None:
        return list(header.entries)
    by_number = {e.layer: e for e in header.entries}
    missing = [n for n in layers if n not in by_number]
    if missing:
        raise KeyError(f"layers {missing} not in container (has {header.layers})")
    return [by_number[n] for n in layers]


def decode(
    blob: bytes | bytearray | memoryview,
    layers: Sequence[int] | None = None,
    *,
    device: torch.device | str | None = None,
) -> DecodedCache:
    """Decode all layers, or only the absolute layer numbers in `layers` (reading only their
    sections), onto `device` (default CPU). FormatError on damage; KeyError on absent layers."""
    header = read_header(blob)
    view = memoryview(blob)
    out = DecodedCache([], [], [], [], header)
    for e in _select(header, layers):
        sec = _check_entry(view, header, e)  # every section checksummed and checked once
        try:
            k = decode_stream(
                "k",
                [(r.coder, sec[f"K block {i}"]) for i, r in enumerate(e.k_blocks)],
                sec["K window"],
                e.k_shape,
                header.dtype,
                header.settings,
                e.k_codebook,
                device,
            )
            v = decode_stream(
                "v",
                [(r.coder, sec[f"V block {i}"]) for i, r in enumerate(e.v_blocks)],
                sec["V window"],
                e.v_shape,
                header.dtype,
                header.settings,
                e.v_codebook,
                device,
            )
            idx = decode_indices(sec["indices"], e.k_shape[:3], device) if e.indices else None
        except FormatError:
            raise
        except ValueError as err:
            raise FormatError(f"layer {e.layer}: {err}") from None
        out.keys.append(k)
        out.values.append(v)
        out.indices.append(idx)
        out.layers.append(e.layer)
    return out


def _copied(view: memoryview, header: ContainerHeader, e: LayerEntry) -> EncodedLayer:
    """An EncodedLayer holding the checksum-verified bytes of entry `e`, unchanged."""

    def sec(name: str, ref: SectionRef) -> Section:
        return Section(ref.coder, bytes(_payload(view, header, e.layer, name, ref)), ref.crc)

    return EncodedLayer(
        header.dtype,
        header.settings,
        e.k_shape,
        e.v_shape,
        e.k_codebook,
        e.v_codebook,
        sec("indices", e.indices) if e.indices is not None else None,
        tuple(sec(f"K block {i}", r) for i, r in enumerate(e.k_blocks)),
        tuple(sec(f"V block {i}", r) for i, r in enumerate(e.v_blocks)),
        sec("K window", e.k_window),
        sec("V window", e.v_window),
        None,
    )


def slice_layers(blob: bytes | bytearray | memoryview, start: int, end: int) -> bytes:
    """A valid container with only the layers numbered in [start, end), absolute numbers kept,
    section bytes copied unchanged (their checksums are verified on the way)."""
    header = read_header(blob)
    view = memoryview(blob)
    chosen = [e for e in header.entries if start <= e.layer < end]
    if not chosen:
        raise KeyError(f"no layers in [{start}, {end}) (container has {header.layers})")
    layers = [(e.layer, _copied(view, header, e)) for e in chosen]
    return _write(header.dtype, header.settings, header.meta, header.seq_len, layers)


def append(
    blob: bytes | bytearray | memoryview,
    new_keys: Sequence[torch.Tensor],
    new_values: Sequence[torch.Tensor],
) -> bytes:
    """Append m new tokens to every layer: new_keys/new_values per layer [B, H, m, d] (same m
    for all layers). Only blocks completed by the new tokens are encoded (with the layer's stored
    codebook when it has one); existing block bytes are copied unchanged; the windows are rewritten.
    Kept positions, if stored, continue at seq_len (or at max position + 1 without seq_len)."""
    header = read_header(blob)
    view = memoryview(blob)
    if len(new_keys) != header.num_layers or len(new_values) != header.num_layers:
        raise ValueError(f"need new keys and values for all {header.num_layers} layers")
    counts = {int(k.shape[2]) for k in new_keys if k.dim() == 4}
    if len(counts) != 1:
        raise ValueError("every layer must receive the same number of new tokens")
    m = counts.pop()
    s = header.settings
    layers = []
    for e, nk, nv in zip(header.entries, new_keys, new_values, strict=True):
        if dtype_name(nk.dtype) != header.dtype or nk.shape[:2] != e.k_shape[:2]:
            raise ValueError(
                f"layer {e.layer}: new tokens do not match dtype/shape of the container"
            )
        cur = _copied(view, header, e)
        tail = decode_tails(view, header, e)
        k_all = torch.cat([tail[0], nk.detach().to("cpu")], dim=2)
        v_all = torch.cat([tail[1], nv.detach().to("cpu")], dim=2)
        n_total = e.k_shape[2] + m
        outs = []
        for kind, x, window, nb_old, book in (
            ("k", k_all, s.k_window, len(e.k_blocks), e.k_codebook),
            ("v", v_all, s.v_window, len(e.v_blocks), e.v_codebook),
        ):
            nb_new = encoded_tokens(n_total, window, s.block_tokens) // s.block_tokens - nb_old
            outs.append(encode_stream(kind, x, s, book, nb_new))
        idx = cur.indices
        if idx is not None:
            old_idx = decode_indices(idx.data, e.k_shape[:3], None)
            base = header.seq_len if header.seq_len is not None else int(old_idx.max()) + 1
            fresh = torch.arange(base, base + m, dtype=torch.int64).expand(*e.k_shape[:2], m)
            idx = encode_indices(torch.cat([old_idx, fresh], dim=2))
        shape_k = (e.k_shape[0], e.k_shape[1], n_total, e.k_shape[3])
        shape_v = (e.v_shape[0], e.v_shape[1], n_total, e.v_shape[3])
        layers.append(
            (
                e.layer,
                EncodedLayer(
                    header.dtype,
                    s,
                    shape_k,
                    shape_v,
                    outs[0].codebook,
                    outs[1].codebook,
                    idx,
                    cur.k_blocks + tuple(outs[0].blocks),
                    cur.v_blocks + tuple(outs[1].blocks),
                    outs[0].window,
                    outs[1].window,
                    None,
                ),
            )
        )
    seq_len = header.seq_len + m if header.seq_len is not None else None
    return _write(header.dtype, s, header.meta, seq_len, layers)


def decode_tails(
    view: memoryview, header: ContainerHeader, e: LayerEntry
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-precision window tokens of a layer's K and V (CPU tensors)."""
    s = header.settings
    out = []
    for name, ref, shape, window in (
        ("K window", e.k_window, e.k_shape, s.k_window),
        ("V window", e.v_window, e.v_shape, s.v_window),
    ):
        data = _payload(view, header, e.layer, name, ref)
        out.append(
            decode_stream(
                name[0].lower(),
                [],
                data,
                (
                    shape[0],
                    shape[1],
                    shape[2] - encoded_tokens(shape[2], window, s.block_tokens),
                    shape[3],
                ),
                header.dtype,
                s,
                None,
                None,
            )
        )
    return out[0], out[1]
