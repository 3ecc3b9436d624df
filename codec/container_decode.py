"""Checking and decoding a container's layers: every section checksummed, every stream decoded by
one call per coder and one dequantisation kernel, layers on a thread pool when asked."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from kvpack.codec import lossless
from kvpack.codec.container_format import ContainerHeader, DecodedCache, LayerEntry, SectionRef
from kvpack.codec.container_read import read_header
from kvpack.codec.format_error import FormatError
from kvpack.codec.layer_codec import crc32, decode_indices
from kvpack.codec.rawbytes import itemsize
from kvpack.codec.stream import StreamSpec
from kvpack.codec.stream_decode import Block, check_stream, decode_stream


def payload(
    view: memoryview, header: ContainerHeader, layer: int, name: str, ref: SectionRef
) -> memoryview:
    """The bytes of section `ref` of `layer`, checksum verified; FormatError naming it if not."""
    start = header.data_offset + ref.offset
    data = view[start : start + ref.length]
    if crc32(data) != ref.crc:
        raise FormatError(f"layer {layer} {name}: crc32 mismatch")
    return data


def _stream_sections(
    view: memoryview, header: ContainerHeader, e: LayerEntry, kind: str
) -> tuple[list[Block], memoryview, Block | None]:
    """(blocks as (coder, bytes), window bytes, metadata (coder, bytes) or None) of stream
    `kind` ("k"/"v") of layer `e`, every section checksummed (FormatError naming it if not).
    One loop over the block records: no per-section names unless one is damaged."""
    label = kind.upper()
    refs = e.k_blocks if kind == "k" else e.v_blocks
    base = header.data_offset
    blocks: list[Block] = []
    for i, r in enumerate(refs):
        data = view[base + r.offset : base + r.offset + r.length]
        if crc32(data) != r.crc:
            raise FormatError(f"layer {e.layer} {label} block {i}: crc32 mismatch")
        blocks.append((r.coder, data))
    win_ref = e.k_window if kind == "k" else e.v_window
    window = payload(view, header, e.layer, f"{label} window", win_ref)
    meta_ref = e.k_meta if kind == "k" else e.v_meta
    meta = None
    if meta_ref is not None:
        meta = (meta_ref.coder, payload(view, header, e.layer, f"{label} metadata", meta_ref))
    return blocks, window, meta


def _check_entry(view: memoryview, header: ContainerHeader, e: LayerEntry) -> None:
    """Checksums and structure of every section of one layer (no tensor decoding)."""
    s = e.settings
    size = itemsize(header.dtype)
    for kind, shape, book in (("k", e.k_shape, e.k_codebook), ("v", e.v_shape, e.v_codebook)):
        spec = StreamSpec.of(kind, s)
        label = kind.upper()
        sizes = e.block_tokens(kind)
        blocks, window, meta = _stream_sections(view, header, e, kind)
        try:
            check_stream(spec, blocks, shape, header.dtype, book, meta, sizes)
        except ValueError as err:
            raise FormatError(f"layer {e.layer} {label} {err}") from None
        n_tail = shape[2] - sum(sizes)
        try:
            lossless.check_frame(window, shape[0] * shape[1] * n_tail * shape[3] * size)
        except ValueError as err:
            raise FormatError(f"layer {e.layer} {label} window: {err}") from None
    if e.indices is not None:
        idx = payload(view, header, e.layer, "indices", e.indices)
        try:
            lossless.check_frame(idx, 8 * math.prod(e.k_shape[:3]))
        except ValueError as err:
            raise FormatError(f"layer {e.layer} indices: {err}") from None


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


def _decode_part(
    view: memoryview,
    header: ContainerHeader,
    e: LayerEntry,
    kind: str,
    device: torch.device | str | None,
    out: torch.Tensor | None,
) -> torch.Tensor | None:
    """Stream `kind` ("k", "v") of layer `e`, or its kept positions ("indices"; None when the
    layer stores none), checksummed and decoded; FormatError naming the layer and stream."""
    label = kind.upper() if kind != "indices" else kind
    try:
        if kind == "indices":
            if e.indices is None:
                return None
            data = payload(view, header, e.layer, "indices", e.indices)
            return decode_indices(data, e.k_shape[:3], device)
        blocks, window, meta = _stream_sections(view, header, e, kind)
        shape = e.k_shape if kind == "k" else e.v_shape
        book = e.k_codebook if kind == "k" else e.v_codebook
        return decode_stream(
            StreamSpec.of(kind, e.settings),
            blocks,
            window,
            shape,
            header.dtype,
            book,
            device,
            out,
            meta,
            e.block_tokens(kind),
        )
    except FormatError:
        raise
    except ValueError as err:
        raise FormatError(f"layer {e.layer} {label}: {err}") from None


def decode(
    blob: bytes | bytearray | memoryview,
    layers: Sequence[int] | None = None,
    *,
    device: torch.device | str | None = None,
    threads: int = 1,
    into: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> DecodedCache:
    """Decode all layers, or only the absolute layer numbers in `layers` (reading only their
    sections), onto `device` (default CPU). FormatError on damage; KeyError on absent layers.

    threads: decode the layers' K and V streams on this many threads (the kernels release the
    GIL; 1 = in the calling thread). into: per decoded layer, CPU tensors (K [B, H, n, dk], V
    [B, H, n, dv] of the container's dtype, e.g. reused or pinned buffers) to decode into
    instead of allocating; with a `device`, the result is their copy there.
    """
    header = read_header(blob)
    view = memoryview(blob)
    entries = _select(header, layers)
    if into is not None and len(into) != len(entries):
        raise ValueError(f"into has {len(into)} (K, V) pairs for {len(entries)} layers")
    jobs: list[Callable[[], torch.Tensor | None]] = []
    for i, e in enumerate(entries):
        for j, kind in enumerate(("k", "v", "indices")):
            target = into[i][j] if into is not None and j < 2 else None
            jobs.append(functools.partial(_decode_part, view, header, e, kind, device, target))
    if threads > 1 and len(jobs) > 3:
        with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
            futures = [pool.submit(job) for job in jobs]
            parts = [f.result() for f in futures]
    else:
        parts = [job() for job in jobs]
    out = DecodedCache([], [], [], [], header)
    for i, e in enumerate(entries):
        k, v, idx = parts[3 * i : 3 * i + 3]
        assert k is not None and v is not None
        out.keys.append(k)
        out.values.append(v)
        out.indices.append(idx)
        out.layers.append(e.layer)
    return out


def decode_tails(
    view: memoryview, header: ContainerHeader, e: LayerEntry
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-precision window tokens of a layer's K and V (CPU tensors)."""
    out = []
    for kind, ref, shape in (("k", e.k_window, e.k_shape), ("v", e.v_window, e.v_shape)):
        spec = StreamSpec.of(kind, e.settings)
        data = payload(view, header, e.layer, f"{kind.upper()} window", ref)
        b, h, n, d = shape
        tail_shape = (b, h, n - sum(e.block_tokens(kind)), d)
        try:
            out.append(decode_stream(spec, [], data, tail_shape, header.dtype, None, None))
        except ValueError as err:
            raise FormatError(f"layer {e.layer} {kind.upper()} window: {err}") from None
    return out[0], out[1]
