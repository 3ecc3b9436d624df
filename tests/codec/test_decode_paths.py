"""Decode on a thread pool and into caller-provided tensors gives the same tensors as the plain
decode; the "auto" coder rule and StreamSpec behave as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpack.codec import QuantSettings, decode, encode, encode_layer, entropy, quant, read_header
from kvpack.codec.stream import StreamSpec


def _strided(x: torch.Tensor) -> torch.Tensor:
    """x with channels outermost in memory (same shape and values, not contiguous)."""
    return x.transpose(2, 3).contiguous().transpose(2, 3)


def _cache(layers: int = 3, n: int = 200) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    ks = [torch.randn(1, 2, n, 16, generator=gen).half() for _ in range(layers)]
    vs = [torch.randn(1, 2, n, 8, generator=gen).half() for _ in range(layers)]
    return ks, vs


@pytest.mark.parametrize("mode", ["lossy", "fixed", "lossless"])
def test_threads_and_into_match_plain_decode(mode: str) -> None:
    ks, vs = _cache()
    s = QuantSettings(mode=mode, block_tokens=16, k_window=8, v_window=20)
    blob = encode(ks, vs, settings=s)
    plain = decode(blob)
    threaded = decode(blob, threads=2)
    # Reused (and non-contiguous) buffers, filled with garbage first.
    into = [
        (
            torch.full_like(k, float("nan")),
            torch.full_like(v, 7.0).transpose(2, 3).contiguous().transpose(2, 3),
        )
        for k, v in zip(ks, vs, strict=True)
    ]
    written = decode(blob, threads=2, into=into)
    for got in (threaded, written):
        for a, b in zip(plain.keys + plain.values, got.keys + got.values, strict=True):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert all(w is t[0] for w, t in zip(written.keys, into, strict=True))
    with pytest.raises(ValueError, match="into"):
        decode(blob, into=into[:1])


def test_auto_codes_with_zstd_unless_huffman_is_clearly_smaller() -> None:
    ks, vs = _cache(layers=1, n=400)
    s = QuantSettings(block_tokens=16, k_window=0, v_window=0)
    header = read_header(encode(ks, vs, settings=s))
    coders = set(header.coders[0]["k"]) | set(header.coders[0]["v"])
    assert coders <= {"zstd", "huffman"}
    # The rule, block by block: Huffman only where its exact size is >= 1 % below zstd's.
    spec = StreamSpec.of("k", s)
    qz = quant.quantize_blocks(ks[0], spec.grouping, spec.block_tokens, spec.error_bound)
    coded = entropy.encode_symbol_blocks(qz.symbols, qz.counts, spec, None, qz.hist)
    zstd_only = entropy.encode_symbol_blocks(
        qz.symbols,
        qz.counts,
        StreamSpec.of("k", QuantSettings(**{**s.__dict__, "entropy": "zstd"})),
        None,
        qz.hist,
    )
    for coder, payload, z in zip(coded.coders, coded.payloads, zstd_only.payloads, strict=True):
        if coder == "huffman":
            assert len(payload) <= (1 - entropy.HUFFMAN_MARGIN) * len(z)
        else:
            assert payload == z
    stats = encode_layer(ks[0], vs[0], settings=s).stats
    assert stats is not None and stats.coded_bits >= 0.98 * stats.entropy_bits


def test_rows_repeated_exactly_make_zstd_smaller_than_huffman() -> None:
    """Repeated value rows (a token repeated in the context) are what zstd wins on."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 2, 16, 32, generator=gen).half()
    v = base.repeat(1, 1, 16, 1)  # 256 tokens, every 16th row identical
    k = torch.randn(1, 2, 256, 32, generator=gen).half()
    s = QuantSettings(block_tokens=64, k_window=0, v_window=0)
    auto = encode([k], [v], settings=s)
    huff = encode([k], [v], settings=QuantSettings(**{**s.__dict__, "entropy": "huffman"}))
    assert set(read_header(auto).coders[0]["v"]) == {"zstd"}
    assert len(auto) < len(huff)


def test_stream_spec_describes_each_stream_once() -> None:
    s = QuantSettings(
        k_error_bound=0.05, v_error_bound=0.1, k_grouping="block", k_window=3, v_window=256
    )
    k, v = StreamSpec.of("k", s), StreamSpec.of("v", s)
    assert (k.grouping, k.levels, k.window, k.symbol_width) == ("block", 21, 3, 1)
    assert (v.grouping, v.levels, v.window) == ("v", 11, 256)
    assert StreamSpec.of("k", s) is k  # cached per settings
    assert k.group_shape((2, 4, 100, 8)) == (2, 4 * 64 * 8)
    assert v.blocks(256 + 130) == 2 and v.encoded_tokens(256 + 130) == 128
    with pytest.raises(ValueError, match="kind"):
        StreamSpec.of("q", s)
    with pytest.raises(ValueError, match="unknown coder"):
        entropy.coder("lz4")
    assert np.dtype(entropy.symbol_dtype(4097)) == np.uint16
