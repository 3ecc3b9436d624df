"""numba kernels: bit streams equal plain-Python reference encoders; corrupt input is rejected."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codec import huffman, kernels, quant


def reference_huffman(symbols: np.ndarray, counts: list[int], lengths: np.ndarray) -> list[bytes]:
    """The documented block payload, one bit string at a time."""
    codes = huffman.canonical_codes(lengths)
    out, pos = [], 0
    for c in counts:
        table, bits = b"", ""
        for lo in range(0, c, huffman.LANE_SYMBOLS):
            lane = symbols[pos + lo : pos + min(c, lo + huffman.LANE_SYMBOLS)]
            words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in lane]
            table += sum(len(w) for w in words).to_bytes(2, "little")
            bits += "".join(words)
        bits += "0" * (-len(bits) % 8)
        out.append(table + int(bits or "0", 2).to_bytes(len(bits) // 8, "big"))
        pos += c
    return out


@settings(max_examples=25, deadline=None)
@given(
    st.integers(2, 600),
    st.lists(st.integers(0, 2500), min_size=1, max_size=4),
    st.integers(0, 2**31 - 1),
)
def test_huffman_encode_equals_reference(alphabet: int, counts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    syms = rng.zipf(1.3, sum(counts)) % alphabet
    syms = syms.astype(np.uint8 if alphabet <= 256 else np.uint16)
    lengths = huffman.code_lengths(np.bincount(syms, minlength=alphabet))
    payloads = huffman.encode_blocks(syms, np.array(counts), lengths)
    assert payloads == reference_huffman(syms, counts, lengths)
    hists = np.stack(
        [np.bincount(b, minlength=alphabet) for b in np.split(syms, np.cumsum(counts)[:-1])]
    )
    assert huffman.payload_bytes(hists, lengths).tolist() == [len(p) for p in payloads]
    assert np.array_equal(huffman.decode_blocks(payloads, counts, lengths), syms)


def test_huffman_rejects_uncodable_symbols_and_invalid_codes() -> None:
    lengths = np.array([1, 2, 0], dtype=np.uint8)  # codes 0, 10; "11" starts no code
    with pytest.raises(huffman.HuffmanError):
        huffman.encode_blocks(np.array([0, 2], dtype=np.uint8), np.array([2]), lengths)
    with pytest.raises(huffman.HuffmanError):
        huffman.encode_blocks(np.array([0, 7], dtype=np.uint8), np.array([2]), lengths)
    (ok,) = huffman.encode_blocks(np.array([1, 0, 1, 0], dtype=np.uint8), np.array([4]), lengths)
    assert np.array_equal(huffman.decode_blocks([ok], [4], lengths), [1, 0, 1, 0])
    bad = ok[:2] + bytes([0b11011000])  # same lane length (6 bits), starts with "11"
    with pytest.raises(huffman.HuffmanError, match="invalid code"):
        huffman.decode_blocks([bad], [4], lengths)


def test_fixed_width_pack_equals_reference() -> None:
    rng = np.random.default_rng(2)
    for bits in (1, 3, 5, 8, 13, 16):
        syms = rng.integers(0, 1 << bits, 1001).astype(np.uint16)
        ref = "".join(format(int(s), f"0{bits}b") for s in syms)
        ref += "0" * (-len(ref) % 8)
        packed = quant.pack_fixed(syms, bits)
        assert packed == int(ref, 2).to_bytes(len(ref) // 8, "big")
        assert np.array_equal(quant.unpack_fixed(packed, len(syms), bits), syms)


def test_block_histograms() -> None:
    syms = np.array([0, 1, 1, 2, 2, 2], dtype=np.uint8)
    hists = kernels.block_histograms(syms, np.array([2, 4], dtype=np.int64), 3)
    assert hists.tolist() == [[1, 1, 0], [0, 1, 3]]
    with pytest.raises(ValueError):
        kernels.block_histograms(syms, np.array([6], dtype=np.int64), 2)


def test_kernels_compile_without_a_cache_location(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba refuses cache=True where no cache directory is writable; we compile in memory."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    def add(a: int, b: int) -> int:
        return a + b

    fn = kernels._kernel(add)
    assert fn(2, 3) == 5
    assert isinstance(fn._cache, caching.NullCache)  # type: ignore[attr-defined]


def test_warm_up_runs() -> None:
    kernels.warm_up()
