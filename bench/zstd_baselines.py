"""Lossless baselines a user would try first: zstd on the raw cache bytes (levels 1 and 3) and
on byte-shuffled planes (the codec's lossless mode, codec/lossless.py), for fp16 and bf16.

zstd runs on the CPU whatever --device says (it works on bytes); input is the whole cache as one
buffer. Ratios are raw bytes / compressed bytes; GB/s are of raw (uncompressed) bytes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any

import zstandard

from kvpack.bench import data
from kvpack.bench.timing import gbps, measure
from kvpack.codec import tensor_to_bytes
from kvpack.codec.lossless import shuffle_compress, unshuffle_decompress

DTYPES = ("fp16", "bf16")


Codec = Callable[[bytes], bytes]


def _methods(itemsize: int, size: int) -> dict[str, tuple[Codec, Codec]]:
    """name -> (compress(raw), decompress(blob)) for one dtype."""
    out: dict[str, tuple[Codec, Codec]] = {}
    for level in (1, 3):
        compressor = zstandard.ZstdCompressor(level=level)
        out[f"zstd-{level} raw"] = (compressor.compress, zstandard.ZstdDecompressor().decompress)
    out["zstd-3 byte-shuffled"] = (
        lambda raw: shuffle_compress(raw, itemsize),
        lambda blob: unshuffle_decompress(blob, itemsize, size),
    )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """{dtype: {method: {"ratio", "bytes", "encode"/"decode": Timing, "encode_gbps",
    "decode_gbps"}}} plus "raw_bytes" per dtype."""
    result: dict[str, Any] = {}
    for dtype in DTYPES:
        ks, vs = data.cache(args, dtype)
        raw = b"".join(tensor_to_bytes(t) for t in ks + vs)
        itemsize = ks[0].element_size()
        entry: dict[str, Any] = {"raw_bytes": len(raw)}
        for name, (enc, dec) in _methods(itemsize, len(raw)).items():
            blob = enc(raw)
            if dec(blob) != raw:
                raise AssertionError(f"{name} on {dtype} did not round-trip")
            enc_t = measure(partial(enc, raw), args.repeats)
            dec_t = measure(partial(dec, blob), args.repeats)
            entry[name] = {
                "bytes": len(blob),
                "ratio": len(raw) / len(blob),
                "encode": enc_t,
                "decode": dec_t,
                "encode_gbps": gbps(len(raw), enc_t),
                "decode_gbps": gbps(len(raw), dec_t),
            }
        result[dtype] = entry
    return result
