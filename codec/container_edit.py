"""Editing containers without decoding their blocks: slicing layers out, appending tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvpack.codec.container_decode import decode_tails, payload
from kvpack.codec.container_format import ContainerHeader, LayerEntry, SectionRef
from kvpack.codec.container_read import read_header
from kvpack.codec.container_write import write
from kvpack.codec.layer_codec import (
    EncodedLayer,
    Section,
    decode_indices,
    encode_indices,
    encode_stream,
)
from kvpack.codec.rawbytes import dtype_name
from kvpack.codec.stream import StreamSpec


def _copied(view: memoryview, header: ContainerHeader, e: LayerEntry) -> EncodedLayer:
    """An EncodedLayer holding the checksum-verified bytes of entry `e`, unchanged."""

    def sec(name: str, ref: SectionRef) -> Section:
        return Section(ref.coder, bytes(payload(view, header, e.layer, name, ref)), ref.crc)

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
        for kind, x, nb_old, book in (
            ("k", k_all, len(e.k_blocks), e.k_codebook),
            ("v", v_all, len(e.v_blocks), e.v_codebook),
        ):
            spec = StreamSpec.of(kind, s)
            outs.append(encode_stream(spec, x, book, spec.blocks(n_total) - nb_old, header.version))
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
                ),
            )
        )
    seq_len = header.seq_len + m if header.seq_len is not None else None
    return write(header.dtype, header.settings, header.meta, seq_len, layers, header.version)
