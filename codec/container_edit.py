"""Editing containers without decoding their blocks: slicing layers out, appending tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpack.codec.block_meta import StreamCodes
from kvpack.codec.container_decode import decode_tails, payload
from kvpack.codec.container_format import ContainerHeader, LayerEntry, SectionRef
from kvpack.codec.container_read import read_header
from kvpack.codec.container_write import write
from kvpack.codec.format_error import FormatError
from kvpack.codec.layer_codec import (
    EncodedLayer,
    Section,
    decode_indices,
    encode_indices,
    encode_stream,
)
from kvpack.codec.rawbytes import dtype_name
from kvpack.codec.stream import StreamSpec, group_shape


def _copied(view: memoryview, header: ContainerHeader, e: LayerEntry) -> EncodedLayer:
    """An EncodedLayer holding the checksum-verified bytes of entry `e`, unchanged."""

    def sec(name: str, ref: SectionRef) -> Section:
        data = bytes(payload(view, header, e.layer, name, ref))
        return Section(ref.coder, data, ref.crc, ref.tokens)

    return EncodedLayer(
        header.dtype,
        e.settings,
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
        header.version,
        sec("K metadata", e.k_meta) if e.k_meta is not None else None,
        sec("V metadata", e.v_meta) if e.v_meta is not None else None,
    )


def _merged_meta(
    spec: StreamSpec,
    shape: tuple[int, int, int, int],
    sizes: tuple[list[int], int],
    old: Section | None,
    new: Section | None,
) -> Section | None:
    """The v2 metadata section of a stream's existing blocks (of sizes[0] tokens each) followed
    by its `sizes[1]` new whole blocks: both hold exact codes, so the merge is exact too. None
    for streams without one (v1, lossless)."""
    if old is None or new is None:
        return None
    groups_old = sum(group_shape(spec.grouping, shape, t)[0] for t in sizes[0])
    groups_new = sizes[1] * spec.group_shape(shape)[0]
    try:
        before = StreamCodes.decode(old.coder, old.data, groups_old)
    except ValueError as err:
        raise FormatError(f"{spec.kind.upper()} metadata: {err}") from None
    after = StreamCodes.decode(new.coder, new.data, groups_new)
    return Section.of(*(before + after).encode(compress=spec.mode == "lossy"))


def slice_layers(blob: bytes | bytearray | memoryview, start: int, end: int) -> bytes:
    """A valid container with only the layers numbered in [start, end), absolute numbers kept,
    section bytes copied unchanged (their checksums are verified on the way)."""
    header = read_header(blob)
    view = memoryview(blob)
    chosen = [e for e in header.entries if start <= e.layer < end]
    if not chosen:
        raise KeyError(f"no layers in [{start}, {end}) (container has {header.layers})")
    layers = [(e.layer, _copied(view, header, e)) for e in chosen]
    return write(header.dtype, header.settings, header.meta, header.seq_len, layers, header.version)


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
    layers = []
    for e, nk, nv in zip(header.entries, new_keys, new_values, strict=True):
        if dtype_name(nk.dtype) != header.dtype or nk.shape[:2] != e.k_shape[:2]:
            raise ValueError(
                f"layer {e.layer}: new tokens do not match dtype/shape of the container"
            )
        s = e.settings
        cur = _copied(view, header, e)
        tail = decode_tails(view, header, e)
        k_all = torch.cat([tail[0], nk.detach().to("cpu")], dim=2)
        v_all = torch.cat([tail[1], nv.detach().to("cpu")], dim=2)
        n_total = e.k_shape[2] + m
        outs = []
        metas: list[Section | None] = []
        for kind, x, book, old_meta, shape in (
            ("k", k_all, e.k_codebook, cur.k_meta, e.k_shape),
            ("v", v_all, e.v_codebook, cur.v_meta, e.v_shape),
        ):
            # Whole blocks only: the rest (fewer than block_tokens beyond the window) stays in
            # the window, exact, for the next append to complete.
            spec = StreamSpec.of(kind, s)
            out = encode_stream(spec, x, book, spec.blocks(x.shape[2]), header.version)
            outs.append(out)
            sizes = (e.block_tokens(kind), len(out.blocks))
            metas.append(_merged_meta(spec, shape, sizes, old_meta, out.meta))
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
                    header.version,
                    metas[0],
                    metas[1],
                ),
            )
        )
    seq_len = header.seq_len + m if header.seq_len is not None else None
    return write(header.dtype, header.settings, header.meta, seq_len, layers, header.version)
