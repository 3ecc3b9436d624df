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

from kvpack.codec import huffman, kernels, lossless, quant

# Level 1, not 3: on quantised KV symbols it is 2-4x faster and no larger (measured on 64-token
# blocks of Gaussian fp16 at eb 0.05: 1.011x Shannon at ~950 Msym/s vs 1.016-1.031x at 230-430),
# and "auto" pays this trial on every block.
ZSTD_LEVEL = 1


def shannon_bits(symbols: np.ndarray, n_levels: int) -> float:
    """Total order-0 Shannon information of `symbols` (ints in [0, n_levels)) in bits."""
    flat = np.ascontiguousarray(symbols).reshape(-1)
    hist = kernels.block_histograms(flat, np.array([flat.size], dtype=np.int64), n_levels)
    return histogram_bits(hist[0])


def histogram_bits(hist: np.ndarray) -> float:
    """Order-0 Shannon information in bits (count * empirical entropy) of a symbol histogram."""
    counts = hist[hist > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def symbol_width(n_levels: int) -> int:
    """Bytes per symbol in a zstd payload."""
    return 1 if n_levels <= 256 else 2


@dataclass(frozen=True)
class CodedBlocks:
    """Per-block payloads and the coder of each; `lengths` is the Huffman codebook or None;
    `histogram` counts every input symbol (int64 [n_levels]), for entropy statistics."""

    payloads: list[bytes]
    coders: list[str]
    lengths: np.ndarray | None
    histogram: np.ndarray


def encode_symbol_blocks(
    symbols: np.ndarray,
    counts: np.ndarray,
    n_levels: int,
    entropy: str,
    mode: str,
    lengths: np.ndarray | None = None,
    hists: np.ndarray | None = None,
) -> CodedBlocks:
    """Code consecutive blocks of `symbols` (1-D ints in [0, n_levels), block i holds counts[i]).

    mode "fixed" bit-packs every block. Otherwise `entropy` picks "huffman", "zstd" or "auto"
    (the smaller per block, Huffman on a tie). `lengths`: an existing codebook to reuse
    (appends); when None one is built from these symbols. A block with a symbol the codebook
    cannot code falls back to zstd. `hists`: the blocks' symbol histograms (int64
    [len(counts), n_levels]) when the caller already has them, else they are counted here.
    """
    counts = np.asarray(counts, dtype=np.int64)
    symbols = np.ascontiguousarray(symbols).reshape(-1)
    bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
    # One pass: per-block histograms give the codebook, each block's exact Huffman size and
    # codability, and the entropy statistics, so Huffman only runs on blocks it wins.
    if hists is None:
        hists = kernels.block_histograms(symbols, counts, n_levels)
    total = hists.sum(axis=0)
    blocks = [symbols[bounds[i] : bounds[i + 1]] for i in range(len(counts))]
    if mode == "fixed":
        bits = quant.fixed_bits(n_levels)
        packed = [quant.pack_fixed(blk, bits) for blk in blocks]
        return CodedBlocks(packed, ["fixed"] * len(counts), None, total)
    zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    width = "<u2" if symbol_width(n_levels) == 2 else np.uint8
    zstd_payloads: list[bytes | None] = [None] * len(counts)
    if entropy in ("auto", "zstd"):
        zstd_payloads = [zc.compress(blk.astype(width, copy=False).data) for blk in blocks]
        if entropy == "zstd":
            return CodedBlocks(
                [p for p in zstd_payloads if p is not None], ["zstd"] * len(counts), None, total
            )
    if lengths is None and symbols.size:
        lengths = huffman.code_lengths(total)
    use_huff = np.zeros(len(counts), dtype=bool)
    if lengths is not None:
        codable = hists[:, lengths == 0].sum(axis=1) == 0
        use_huff = codable & (counts > 0)
        if entropy == "auto":
            huff_size = huffman.payload_bytes(hists, lengths)
            zstd_size = np.array([len(z) if z is not None else 0 for z in zstd_payloads])
            use_huff &= huff_size <= zstd_size
    payloads: list[bytes] = []
    coders: list[str] = []
    huff_idx = np.flatnonzero(use_huff)
    huff: list[bytes] = []
    if len(huff_idx) and lengths is not None:
        sel = (
            symbols
            if len(huff_idx) == len(counts)
            else np.concatenate([blocks[i] for i in huff_idx])
        )
        huff = huffman.encode_blocks(sel, counts[huff_idx], lengths)
    next_huff = iter(huff)
    for i in range(len(counts)):
        if use_huff[i]:
            payloads.append(next(next_huff))
            coders.append("huffman")
            continue
        z = zstd_payloads[i]
        payloads.append(
            z if z is not None else zc.compress(blocks[i].astype(width, copy=False).data)
        )
        coders.append("zstd")
    used = lengths if "huffman" in coders else None
    return CodedBlocks(payloads, coders, used, total)


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
) -> np.ndarray:
    """Decode blocks into one array: block i's counts[i] symbols follow block i-1's (uint16).
    Huffman blocks are decoded together in one pass.

    ValueError subclasses on any framing or coding inconsistency. Symbols are not checked
    against n_levels here: the dequantisation kernel does that in its pass over them.
    """
    bounds = np.concatenate(([0], np.cumsum(counts, dtype=np.int64))).tolist()
    huff = [i for i, c in enumerate(coders) if c == "huffman"]
    if len(huff) == len(coders):  # the usual case: the decoder's output is the result
        if lengths is None:
            raise ValueError("Huffman block in a stream without a codebook")
        return huffman.decode_blocks(payloads, counts, lengths)
    out = np.empty(bounds[-1], dtype=np.uint16)
    if huff:
        if lengths is None:
            raise ValueError("Huffman block in a stream without a codebook")
        syms = huffman.decode_blocks(
            [payloads[i] for i in huff], [counts[i] for i in huff], lengths
        )
        pos = 0
        for i in huff:
            out[bounds[i] : bounds[i + 1]] = syms[pos : pos + counts[i]]
            pos += counts[i]
    for i, coder in enumerate(coders):
        part = out[bounds[i] : bounds[i + 1]]
        if coder == "fixed":
            check_symbol_block(coder, payloads[i], counts[i], n_levels, lengths)
            part[:] = quant.unpack_fixed(payloads[i], counts[i], quant.fixed_bits(n_levels))
        elif coder == "zstd":
            width = symbol_width(n_levels)
            raw = lossless.zstd_exact(payloads[i], counts[i] * width)
            part[:] = np.frombuffer(raw, dtype="<u2" if width == 2 else np.uint8)
        elif coder != "huffman":
            raise ValueError(f"unknown coder {coder!r}")
    return out
