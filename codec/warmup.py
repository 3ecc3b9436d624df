"""Compile (or load from numba's cache) every codec kernel before the first request."""

from __future__ import annotations

import numpy as np
import torch

from kvpack.codec import entropy, huffman, kernels, quant
from kvpack.codec.quant_settings import QuantSettings
from kvpack.codec.stream import StreamSpec


def warm_up() -> None:
    """Compile (or load from the cache) every kernel for the argument types the codec uses, so
    the first request does not pay the JIT time (seconds when no cache is available)."""
    for dtype in (np.uint8, np.uint16):
        syms = np.array([0, 1, 1, 2], dtype=dtype)
        counts = np.array([4], dtype=np.int64)
        lengths = huffman.code_lengths(kernels.block_histograms(syms, counts, 3)[0])
        payloads = huffman.encode_blocks(syms, counts, lengths)
        huffman.decode_blocks(payloads, [4], lengths)  # the uint8 decoder
        wide = np.empty(4, dtype=np.uint16)
        huffman.decode_blocks(payloads, [4], lengths, wide, np.zeros(1, dtype=np.int64))
        kernels.unpack_fixed(kernels.pack_fixed(syms, 2), 4, 2)
    # zstd blocks into uint8 and uint16 symbols (libzstd's kernel, where it loads).
    for eb in (0.5, 1 / 299):
        spec = StreamSpec.of("v", QuantSettings(v_error_bound=eb, entropy="zstd"))
        syms = np.zeros(4, dtype=entropy.symbol_dtype(spec.levels))
        coded = entropy.encode_symbol_blocks(syms, np.array([4]), spec)
        entropy.decode_symbol_blocks(coded.coders, coded.payloads, [4], spec, None)
    # Every float dtype, uint8 and uint16 symbols, and both array layouts numba tells apart
    # (one block of one head is C-contiguous once transposed; anything larger is strided).
    for float_dtype in (torch.float32, torch.float16, torch.bfloat16):
        for heads, tokens in ((1, 2), (2, 4)):
            x = torch.ones(1, heads, tokens, 2, dtype=float_dtype)
            for eb in (0.5, 2.0**-12):
                qz = quant.quantize_blocks(x, "v", 2, eb)
                symbols = qz.symbols.astype(np.uint16)
                quant.dequantize_blocks(symbols, qz.mn, qz.step, "v", quant.levels(eb), x)
