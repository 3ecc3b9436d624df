"""Length-limited canonical Huffman: canonical, limited, lossless, close to entropy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codec import huffman
from kvpack.codec.entropy import shannon_bits


def is_prefix_free(codes: np.ndarray, lengths: np.ndarray) -> bool:
    words = sorted(
        format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths, strict=True) if n > 0
    )
    return all(not b.startswith(a) for a, b in itertools.pairwise(words))


def test_canonical_codes_are_consecutive_by_length_then_symbol() -> None:
    lengths = np.array([3, 2, 3, 0, 2, 3, 3], dtype=np.uint8)
    codes = huffman.canonical_codes(lengths)
    assert [int(codes[s]) for s in (1, 4, 0, 2, 5, 6)] == [0b00, 0b01, 0b100, 0b101, 0b110, 0b111]
    assert is_prefix_free(codes, lengths)


def test_length_limit_honoured_on_fibonacci_counts() -> None:
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    lengths = huffman.code_lengths(np.array(fib), limit=16)
    assert int(lengths.max()) == 16
    kraft = (2.0 ** -lengths.astype(np.float64)).sum()
    assert kraft == pytest.approx(1.0)
    assert is_prefix_free(huffman.canonical_codes(lengths), lengths)
    # more frequent symbols never get longer codes
    order = np.argsort(-np.array(fib), kind="stable")
    assert np.all(np.diff(lengths[order].astype(int)) >= 0)


def test_degenerate_alphabets() -> None:
    assert huffman.code_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]
    syms = np.full(1000, 1, dtype=np.uint16)
    lengths = huffman.code_lengths(np.bincount(syms, minlength=3))
    payloads = huffman.encode_blocks(syms, np.array([1000]), lengths)
    assert np.array_equal(huffman.decode_blocks(payloads, [1000], lengths), syms)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 300),
    st.lists(st.integers(0, 3000), min_size=1, max_size=4),
    st.floats(0.3, 40.0),
    st.integers(0, 2**31 - 1),
)
def test_decode_inverts_encode(alphabet: int, counts: list[int], spread: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    total = sum(counts)
    syms = np.clip(np.round(rng.laplace(alphabet / 2, spread, total)), 0, alphabet - 1)
    syms = syms.astype(np.uint16)
    lengths = huffman.code_lengths(np.bincount(syms, minlength=alphabet))
    assert int(lengths.max(initial=0)) <= huffman.MAX_BITS
    payloads = huffman.encode_blocks(syms, np.array(counts), lengths)
    assert len(payloads) == len(counts)
    assert np.array_equal(huffman.decode_blocks(payloads, counts, lengths), syms)
    # blocks decode on their own too
    first = np.cumsum([0, *counts])
    for i, c in enumerate(counts):
        one = huffman.decode_blocks([payloads[i]], [c], lengths)
        assert np.array_equal(one, syms[first[i] : first[i + 1]])


@pytest.mark.parametrize("dist", ["gauss", "laplace"])
def test_within_two_percent_of_entropy_on_quantised_kv(dist: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, 200_000) if dist == "gauss" else rng.laplace(0, 1, 200_000)
    lo, hi = np.quantile(x, [0.001, 0.999])
    syms = np.round((np.clip(x, lo, hi) - lo) / (0.05 * (hi - lo))).astype(np.uint16)
    lengths = huffman.code_lengths(np.bincount(syms, minlength=21))
    payloads = huffman.encode_blocks(syms, np.array([65536, 65536, 68928]), lengths)
    bits = 8 * sum(len(p) for p in payloads)  # lane tables and padding included
    assert bits <= 1.02 * shannon_bits(syms, 21)


def test_corrupt_payloads_are_rejected() -> None:
    rng = np.random.default_rng(5)
    syms = rng.integers(0, 5, 2000).astype(np.uint16)
    lengths = huffman.code_lengths(np.bincount(syms, minlength=5))
    (payload,) = huffman.encode_blocks(syms, np.array([2000]), lengths)
    with pytest.raises(huffman.HuffmanError):
        huffman.decode_blocks([payload[:-1]], [2000], lengths)
    with pytest.raises(huffman.HuffmanError):
        huffman.decode_blocks([payload], [1999], lengths)
    bad = bytearray(payload)
    bad[0] ^= 1  # lane table no longer matches the stream
    with pytest.raises(huffman.HuffmanError):
        huffman.decode_blocks([bytes(bad)], [2000], lengths)
    with pytest.raises(huffman.HuffmanError):
        huffman.check_lengths(np.array([1, 1, 1], dtype=np.uint8))


def _wide_skewed_block(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Geometric symbols over a wide alphabet: short codes plus codes longer than the decoder's
    multi-symbol window, so both of its paths run."""
    rng = np.random.default_rng(seed)
    syms = np.minimum(rng.geometric(0.08, n) - 1, 299).astype(np.uint16)
    lengths = huffman.code_lengths(np.bincount(syms, minlength=300))
    assert int(lengths.max()) > 12
    return syms, lengths


def test_four_lane_decoder_round_trips_and_rejects_damage() -> None:
    # 9 full lanes (two groups of four decoded together, one alone) plus a short last lane.
    n = 9 * huffman.LANE_SYMBOLS + 777
    syms, lengths = _wide_skewed_block(n, seed=11)
    counts = [n, 3000]
    payloads = huffman.encode_blocks(np.concatenate([syms, syms[:3000]]), counts, lengths)
    out = huffman.decode_blocks(payloads, counts, lengths)
    assert np.array_equal(out, np.concatenate([syms, syms[:3000]]))
    # Flip single bits inside the lanes decoded four at a time: never a crash, a read past the
    # buffer or the original symbols. Huffman codes resynchronise, so many flips still end each
    # lane on its stored length and decode other symbols: the container's crc32 catches those.
    rng = np.random.default_rng(12)
    table = 2 * (-(-n // huffman.LANE_SYMBOLS))
    rejected = 0
    for _ in range(200):
        bad = bytearray(payloads[0])
        pos = int(rng.integers(table, len(bad) - 1))
        bad[pos] ^= 1 << int(rng.integers(8))
        try:
            got = huffman.decode_blocks([bytes(bad)], [n], lengths)
        except huffman.HuffmanError:
            rejected += 1
        else:
            assert not np.array_equal(got, syms)
    assert rejected > 0
    # Swapping two lane lengths in a group of four moves every later lane's start.
    bad = bytearray(payloads[0])
    bad[2:4], bad[4:6] = payloads[0][4:6], payloads[0][2:4]
    if bad != payloads[0]:
        with pytest.raises(huffman.HuffmanError):
            huffman.decode_blocks([bytes(bad)], [n], lengths)
