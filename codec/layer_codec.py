"""Encode and decode one layer's K and V into container sections (KVComp §2 per layer).

The tokens of each stream older than its window are cut into blocks of T = block_tokens tokens
and quantised (or, in lossless mode, byte-shuffled + zstd); in format v2 the last block may be
shorter (quantised streams), in v1 and lossless mode the tokens that do not fill a block stay in
the window. The window's newest tokens stay in full precision. K and V are separate streams
with their own window, codebook and (v2) group metadata section.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from isal import isal_zlib

from kvpack.codec import block_meta, entropy, lossless, quant
from kvpack.codec.container_format import VERSION
from kvpack.codec.quant_settings import QuantSettings
from kvpack.codec.rawbytes import dtype_name, tensor_to_array
from kvpack.codec.stream import StreamSpec, group_shape

# CRC-32 (zlib's polynomial and values) at ISA-L speed: 13 GB/s here against zlib's 2.3.
crc32 = isal_zlib.crc32


@dataclass(frozen=True)
class Section:
    """One independently checksummed piece of a container: coder name, bytes, crc32; `tokens`:
    a v2 quantised block shorter than block_tokens records its token count (else None)."""

    coder: str
    data: bytes
    crc: int
    tokens: int | None = None

    @classmethod
    def of(cls, coder: str, data: bytes, tokens: int | None = None) -> Section:
        return cls(coder, data, crc32(data), tokens)


@dataclass(frozen=True)
class LayerStats:
    """Reconstruction and size figures of one encoded layer.

    Errors compare the decoded tensor (in the input dtype) with the input, over all tokens
    (window tokens are exact): max |x - x̂| and ||x - x̂||_F / ||x||_F (0 for an all-zero x).
    symbols: quantised symbols coded (constant groups have none); coded_bits: bits of their coded
    payloads (no metadata); entropy_bits: order-0 Shannon information of those symbols, per
    stream (K, V) and summed. raw_bytes: K+V input bytes; stored_bytes: all section bytes.
    """

    key_max_abs_error: float
    value_max_abs_error: float
    key_rel_error: float
    value_rel_error: float
    symbols: int
    coded_bits: int
    entropy_bits: float
    raw_bytes: int
    stored_bytes: int


@dataclass(frozen=True)
class EncodedLayer:
    """One layer ready for `assemble`: shapes [B, H, n, d], codebooks (code lengths or None) and
    sections. `stats` is None for layers copied out of an existing container."""

    dtype: str
    settings: QuantSettings
    k_shape: tuple[int, int, int, int]
    v_shape: tuple[int, int, int, int]
    k_codebook: tuple[int, ...] | None
    v_codebook: tuple[int, ...] | None
    indices: Section | None
    k_blocks: tuple[Section, ...]
    v_blocks: tuple[Section, ...]
    k_window: Section
    v_window: Section
    stats: LayerStats | None
    version: int = VERSION  # container format its block sections are laid out for
    # v2 quantised streams: the group metadata of all of the stream's blocks (block_meta).
    k_meta: Section | None = None
    v_meta: Section | None = None

    @property
    def sections(self) -> list[Section]:
        """Sections in container order: indices, K metadata, K blocks, V metadata, V blocks, K
        window, V window (absent ones left out)."""
        return [
            s
            for s in (
                self.indices,
                self.k_meta,
                *self.k_blocks,
                self.v_meta,
                *self.v_blocks,
                self.k_window,
                self.v_window,
            )
            if s is not None
        ]

    def stream_bytes(self, kind: str) -> int:
        """Bytes of stream `kind`'s ("k"/"v") blocks and metadata (its window left out)."""
        blocks, meta = (self.k_blocks, self.k_meta) if kind == "k" else (self.v_blocks, self.v_meta)
        return sum(len(b.data) for b in blocks) + (len(meta.data) if meta is not None else 0)

    @property
    def nbytes(self) -> int:
        """Stored bytes of all sections."""
        return sum(len(s.data) for s in self.sections)


def encoded_tokens(n: int, window: int, block_tokens: int) -> int:
    """Tokens of a stream of n tokens that live in blocks: whole blocks older than the window."""
    return max(0, n - window) // block_tokens * block_tokens


def group_count(kind: str, shape: tuple[int, ...], settings: QuantSettings) -> tuple[int, int]:
    """(groups per block G, values per group m) of stream `kind` ("k"/"v") for shape [B,H,n,d]."""
    return StreamSpec.of(kind, settings).group_shape(shape)


@dataclass
class _StreamOut:
    blocks: list[Section]
    window: Section
    codebook: tuple[int, ...] | None
    max_err: float
    sq_err: float
    sq_norm: float
    symbols: int
    coded_bits: int
    entropy_bits: float
    meta: Section | None = None


def _window_section(tail: torch.Tensor) -> Section:
    """The full-precision window [B, H, t, d] as a lossless section."""
    return Section.of(
        "lossless", lossless.shuffle_compress(tensor_to_array(tail), tail.element_size())
    )


def _short_block_pays(spec: StreamSpec, shape: tuple[int, ...], t: int, itemsize: int) -> bool:
    """Whether a short block of t tokens can never take more bytes than those tokens in full
    precision: 8 bytes of metadata per group at most (block_meta) plus its symbols' worst case
    (fixed width; zstd's bound, or 16 bits per symbol with forced Huffman). Then no v2 stream
    exceeds v1's size bound, and a K channel block of 1-2 tokens (a group per channel, each
    worth 8 bytes) is not made at all."""
    g, m = group_shape(spec.grouping, shape, t)
    values = g * m
    if spec.mode == "fixed":
        payload = (values * spec.fixed_bits + 7) // 8
    else:
        width = 2 if spec.entropy == "huffman" else spec.symbol_width
        payload = values * width + values // 128 + 2 * (values // 1024 + 1) + 64
    return 8 * g + payload <= values * itemsize


def encode_stream(
    spec: StreamSpec,
    x: torch.Tensor,
    codebook: tuple[int, ...] | None = None,
    n_blocks: int | None = None,
    version: int = VERSION,
) -> _StreamOut:
    """Encode K or V [B, H, n, d] as `spec` says, as block sections and a window section.

    Default: every token older than the window goes into blocks, whole blocks of block_tokens
    and, in v2 lossy/fixed modes, one last short block of the rest (so the window holds exactly
    the window setting's tokens; v1 and lossless keep those tokens in the window). n_blocks:
    exactly that many whole blocks, the rest in the window (append). `codebook` is reused if
    given; `version`: the container format the blocks are laid out for (2: compact group
    metadata, 1: fp32 per block, for appending to v1 containers)."""
    t = spec.block_tokens
    lattice = version >= 2
    nb = spec.blocks(x.shape[2]) if n_blocks is None else n_blocks
    short = 0
    if n_blocks is None and lattice and spec.mode != "lossless":
        short = max(0, x.shape[2] - spec.window) - nb * t
        if short and not _short_block_pays(spec, tuple(x.shape), short, x.element_size()):
            short = 0  # those few tokens stay in the window, exact
    enc_end = nb * t + short
    enc, tail = x[:, :, :enc_end], x[:, :, enc_end:]
    window = _window_section(tail)
    if spec.mode == "lossless":
        sq_norm = float(x.to(torch.float32).square().sum())
        blocks = [_window_section(enc[:, :, i * t : (i + 1) * t]) for i in range(nb)]
        return _StreamOut(blocks, window, None, 0.0, 0.0, sq_norm, 0, 0, 0.0)
    parts = [quant.quantize_blocks(x, spec.grouping, t, spec.error_bound, nb, lattice=lattice)]
    if short:  # its own groups: a V block of fewer tokens has fewer groups
        last = x[:, :, nb * t : enc_end]
        parts.append(
            quant.quantize_blocks(last, spec.grouping, short, spec.error_bound, 1, lattice=True)
        )
    if len(parts) == 1:  # no short block: no copy of the symbols
        symbols, counts, hist = parts[0].symbols, parts[0].counts, parts[0].hist
    else:
        symbols = np.concatenate([q.symbols for q in parts])
        counts = np.concatenate([q.counts for q in parts])
        hist = np.concatenate([q.hist for q in parts])
    # Window tokens are exact: only their squares add to the norm.
    sq_norm = sum(q.sq_norm for q in parts) + float(tail.to(torch.float64).square().sum())
    lengths = np.array(codebook, dtype=np.uint8) if codebook is not None else None
    coded = entropy.encode_symbol_blocks(symbols, counts, spec, lengths, hist)
    sizes = [t] * nb + ([short] if short else [])
    meta = None
    if lattice:  # one metadata section; lossy entropy-codes it, fixed (the baseline) keeps it raw
        codes = block_meta.StreamCodes.of(parts[0])
        for q in parts[1:]:
            codes = codes + block_meta.StreamCodes.of(q)
        meta = Section.of(*codes.encode(compress=spec.mode == "lossy"))
        blocks = [
            Section.of(c, p, size if size < t else None)
            for c, p, size in zip(coded.coders, coded.payloads, sizes, strict=True)
        ]
    else:
        heads = block_meta.encode_v1(parts[0])
        blocks = [
            Section.of(coder, heads[i] + payload)
            for i, (coder, payload) in enumerate(zip(coded.coders, coded.payloads, strict=True))
        ]
    coded_bits = 8 * sum(len(p) for p in coded.payloads)
    new_book = tuple(int(v) for v in coded.lengths) if coded.lengths is not None else codebook
    return _StreamOut(
        blocks,
        window,
        new_book,
        max(q.max_err for q in parts),
        sum(q.sq_err for q in parts),
        sq_norm,
        int(symbols.size),
        coded_bits,
        entropy.histogram_bits(coded.histogram),
        meta,
    )


def encode_indices(indices: torch.Tensor) -> Section:
    """Kept positions [B, H, n] int64 as zstd of their int64 LE deltas along the last axis."""
    idx = indices.detach().to("cpu", torch.int64).numpy()
    deltas = np.diff(idx, axis=-1, prepend=np.zeros((*idx.shape[:-1], 1), dtype=np.int64))
    raw = np.ascontiguousarray(deltas).astype("<i8").tobytes()
    return Section.of("zstd-delta", zstandard.ZstdCompressor(level=3).compress(raw))


def decode_indices(
    payload: bytes | memoryview, shape: tuple[int, ...], device: torch.device | str | None
) -> torch.Tensor:
    """Inverse of encode_indices for kept positions of `shape` [B, H, n]."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = lossless.zstd_exact(payload, 8 * count)
    deltas = np.frombuffer(raw, dtype="<i8").reshape(shape)
    out = torch.from_numpy(np.cumsum(deltas, axis=-1, dtype=np.int64))
    return out if device is None else out.to(device)


def check_layer_input(
    k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor | None
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """ValueError unless K, V are [B, H, n, d] of one float dtype (fp32/fp16/bf16) with equal
    B, H, n and indices (if any) is integer [B, H, n]."""
    if k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"keys/values must be [B, H, n, d], got {tuple(k.shape)} / {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in B, H or n")
    if k.dtype != v.dtype or dtype_name(k.dtype) not in ("fp32", "fp16", "bf16"):
        raise ValueError(
            f"keys/values must share a dtype among fp32/fp16/bf16, got {k.dtype}/{v.dtype}"
        )
    if indices is not None and (
        tuple(indices.shape) != tuple(k.shape[:3])
        or indices.dtype.is_floating_point
        or indices.dtype == torch.bool
    ):
        raise ValueError(f"indices must be integer [B, H, n] = {tuple(k.shape[:3])}")
    ks = (int(k.shape[0]), int(k.shape[1]), int(k.shape[2]), int(k.shape[3]))
    vs = (int(v.shape[0]), int(v.shape[1]), int(v.shape[2]), int(v.shape[3]))
    return ks, vs


def encode_layer(
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor | None = None,
    settings: QuantSettings = QuantSettings(),  # noqa: B008 (frozen, immutable)
    *,
    version: int = VERSION,
) -> EncodedLayer:
    """Encode one layer: k [B, H, n, dk], v [B, H, n, dv] (fp32/fp16/bf16, any device), indices
    [B, H, n] int64 kept positions or None. Thread-safe; layers can be encoded in parallel.
    `version`: container format to lay the blocks out for (1 only to append to v1 containers)."""
    settings.validate()
    k_shape, v_shape = check_layer_input(k, v, indices)
    ko = encode_stream(StreamSpec.of("k", settings), k, version=version)
    vo = encode_stream(StreamSpec.of("v", settings), v, version=version)
    idx = encode_indices(indices) if indices is not None else None
    raw = (k.numel() + v.numel()) * k.element_size()
    layer = EncodedLayer(
        dtype_name(k.dtype),
        settings,
        k_shape,
        v_shape,
        ko.codebook,
        vo.codebook,
        idx,
        tuple(ko.blocks),
        tuple(vo.blocks),
        ko.window,
        vo.window,
        None,
        version,
        ko.meta,
        vo.meta,
    )
    stats = LayerStats(
        key_max_abs_error=ko.max_err,
        value_max_abs_error=vo.max_err,
        key_rel_error=(ko.sq_err / ko.sq_norm) ** 0.5 if ko.sq_norm > 0 else 0.0,
        value_rel_error=(vo.sq_err / vo.sq_norm) ** 0.5 if vo.sq_norm > 0 else 0.0,
        symbols=ko.symbols + vo.symbols,
        coded_bits=ko.coded_bits + vo.coded_bits,
        entropy_bits=ko.entropy_bits + vo.entropy_bits,
        raw_bytes=raw,
        stored_bytes=layer.nbytes,
    )
    return EncodedLayer(**{**layer.__dict__, "stats": stats})
