"""Entropy coding of quantised symbols per block: canonical Huffman or zstd, whichever is smaller.

Coders recorded per block in the container: "huffman" (codebook per layer and K/V), "zstd"
(zstd over the symbols as uint8, or uint16 LE above 256 levels), "fixed" (the baseline's
ceil(log2(levels)) bits per symbol).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from kvpack.codec import huffman, lossless, quant

ZSTD_LEVEL = 3


def shannon_bits(symbols: np.ndarray, n_levels: int) -> float:
    """Total order-0 Shannon information of `symbols` in bits (count * empirical entropy)."""
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols.reshape(-1), minlength=n_levels).astype(np.float64)
    p = counts[counts > 0] / symbols.size
    return float(-(counts[counts > 0] * np.log2(p)).sum())


def symbol_width(n_levels: int) -> int:
    """Bytes per symbol in a zstd payload."""
    return 1 if n_levels <= 256 else 2


@dataclass(frozen=True)
class CodedBlocks:
    """Per-block payloads and the coder of each; `lengths` is the Huffman codebook or None."""

    payloads: list[bytes]
    coders: list[str]
    lengths: np.ndarray | None


def encode_symbol_blocks(
    symbols: np.ndarray,
    counts: np.ndarray,
    n_levels: int,
    entropy: str,
    mode: str,
    lengths: np.ndarray | None = None,
) -> CodedBlocks:
    """Code consecutive blocks of `symbols` (1-D, block i holds counts[i]).

    mode "fixed" bit-packs every block. Otherwise `entropy` picks "huffman", "zstd" or "auto"
    (the smaller per block). `lengths`: an existing codebook to reuse (appends); when None one is
    built from these symbols. A block with a symbol the codebook cannot code falls back to zstd.
    """
    bounds = np.concatenate(([0], np.cumsum(counts)))
    if mode == "fixed":
        bits = quant.fixed_bits(n_levels)
        packed = [
            quant.pack_fixed(symbols[bounds[i] : bounds[i + 1]], bits) for i in range(len(counts))
        ]
        return CodedBlocks(packed, ["fixed"] * len(counts), None)
    zstd_payloads: list[bytes | None] = [None] * len(counts)
    if entropy in ("auto", "zstd"):
        zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        wide = symbols.astype("<u2") if symbol_width(n_levels) == 2 else symbols.astype(np.uint8)
        zstd_payloads = [
            zc.compress(wide[bounds[i] : bounds[i + 1]].tobytes()) for i in range(len(counts))
        ]
        if entropy == "zstd":
            return CodedBlocks(
                [p for p in zstd_payloads if p is not None], ["zstd"] * len(counts), None
            )
    if lengths is None and symbols.size:
        lengths = huffman.code_lengths(np.bincount(symbols, minlength=n_levels))
    payloads: list[bytes] = []
    coders: list[str] = []
    codable = np.ones(len(counts), dtype=bool)
    if lengths is not None and symbols.size:
        ok = lengths[symbols] > 0
        bad_blocks = np.bincount(
            np.repeat(np.arange(len(counts)), counts), weights=~ok, minlength=len(counts)
        )
        codable = bad_blocks == 0
    huff_idx = np.flatnonzero(codable & (np.asarray(counts) > 0))
    huff: dict[int, bytes] = {}
    if len(huff_idx) and lengths is not None:
        sel = np.concatenate([symbols[bounds[i] : bounds[i + 1]] for i in huff_idx])
        coded = huffman.encode_blocks(sel, np.asarray(counts)[huff_idx], lengths)
        huff = dict(zip(huff_idx.tolist(), coded, strict=True))
    zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    for i in range(len(counts)):
        z = zstd_payloads[i]
        h = huff.get(i)
        if h is not None and (z is None or len(h) <= len(z)):
            payloads.append(h)
            coders.append("huffman")
            continue
        if z is None:
            width = "<u2" if symbol_width(n_levels) == 2 else np.uint8
            z = zc.compress(symbols[bounds[i] : bounds[i + 1]].astype(width).tobytes())
        payloads.append(z)
        coders.append("zstd")
    used = lengths if "huffman" in coders else None
    return CodedBlocks(payloads, coders, used)


def check_symbol_block(
    coder: str, payload: bytes | memoryview, count: int, n_levels: int, lengths: np.ndarray | None
) -> None:
    """Structural check of one coded block (sizes only, no decoding); ValueError subclasses."""
    if coder == "fixed":
        need = (count * quant.fixed_bits(n_levels) + 7) // 8
        if len(payload) != need:
            raise ValueError(f"fixed-width payload is {len(payload)} bytes, expected {need}")
    elif coder == "zstd":
        lossless.check_frame(payload, count * symbol_width(n_levels))
    elif coder == "huffman":
        if lengths is None:
            raise ValueError("Huffman block in a stream without a codebook")
        huffman.split_payload(payload, count)
    else:
        raise ValueError(f"unknown coder {coder!r}")


def decode_symbol_blocks(
    coders: Sequence[str],
    payloads: Sequence[bytes | memoryview],
    counts: Sequence[int],
    n_levels: int,
    lengths: np.ndarray | None,
) -> list[np.ndarray]:
    """Decode blocks (uint16 symbols each); Huffman blocks are decoded together in one pass.

    ValueError subclasses on any inconsistency, including a symbol >= n_levels.
    """
    out: list[np.ndarray] = [np.zeros(0, dtype=np.uint16)] * len(coders)
    huff = [i for i, c in enumerate(coders) if c == "huffman"]
    if huff:
        if lengths is None:
            raise ValueError("Huffman block in a stream without a codebook")
        syms = huffman.decode_blocks(
            [payloads[i] for i in huff], [counts[i] for i in huff], lengths
        )
        parts = np.split(syms, np.cumsum([counts[i] for i in huff])[:-1])
        for i, part in zip(huff, parts, strict=True):
            out[i] = part
    for i, coder in enumerate(coders):
        if coder == "fixed":
            check_symbol_block(coder, payloads[i], counts[i], n_levels, lengths)
            out[i] = quant.unpack_fixed(payloads[i], counts[i], quant.fixed_bits(n_levels))
        elif coder == "zstd":
            width = symbol_width(n_levels)
            raw = lossless.zstd_exact(payloads[i], counts[i] * width)
            out[i] = np.frombuffer(raw, dtype="<u2" if width == 2 else np.uint8).astype(np.uint16)
        elif coder != "huffman":
            raise ValueError(f"unknown coder {coder!r}")
    for i, syms in enumerate(out):
        if syms.size and int(syms.max()) >= n_levels:
            raise ValueError(f"block {i}: symbol {int(syms.max())} outside {n_levels} levels")
    return out
