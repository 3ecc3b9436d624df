"""The byte-symbol Huffman decoder (kernels/huffman_decode_u8.py) and the pair-table encoder:
same symbols as the uint16 decoder, every damaged lane rejected or caught, nothing written
outside a block's output range, cached decode tables shared safely. zstd blocks decoded by one
libzstd kernel call (kernels/zstd_native.py) or block by block: same symbols, same rejections."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kvpack.codec import QuantSettings, entropy, huffman
from kvpack.codec.kernels import zstd_native
from kvpack.codec.stream import StreamSpec


def _skewed(n: int, alphabet: int, p: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Geometric symbols: short codes plus codes longer than the 12-bit multi-symbol window."""
    rng = np.random.default_rng(seed)
    syms = np.minimum(rng.geometric(p, n) - 1, alphabet - 1).astype(np.uint8)
    return syms, huffman.code_lengths(np.bincount(syms, minlength=alphabet))


def _decode_u8(payloads: list[bytes], counts: list[int], lengths: np.ndarray) -> np.ndarray:
    # Canaries around and between the blocks' output ranges: nothing may touch them.
    gap = 5
    out = np.full(sum(counts) + gap * (len(counts) + 1), 0xAB, dtype=np.uint8)
    pos = np.cumsum([gap] + [c + gap for c in counts[:-1]]).astype(np.int64)
    huffman.decode_blocks(payloads, counts, lengths, out, pos)
    for p in pos.tolist():
        assert (out[p - gap : p] == 0xAB).all()
    assert (out[-gap:] == 0xAB).all()
    return np.concatenate([out[p : p + c] for p, c in zip(pos.tolist(), counts, strict=True)])


@pytest.mark.parametrize(
    ("alphabet", "p"),
    [(2, 0.5), (11, 0.3), (21, 0.2), (64, 0.1), (65, 0.1), (200, 0.08), (256, 0.05)],
)
def test_byte_decoder_equals_wide_decoder(alphabet: int, p: float) -> None:
    # Blocks of 0, 1, 3, 4 full lanes + a short lane, 9 full lanes (4 + 4 + 1) and a partial one.
    lane = huffman.LANE_SYMBOLS
    counts = [1, 3, 4 * lane + 5, 0, 9 * lane + 777, lane, 2 * lane]
    syms, lengths = _skewed(sum(counts), alphabet, p, seed=alphabet)
    payloads = huffman.encode_blocks(syms, np.array(counts), lengths)
    wide = np.empty(len(syms), dtype=np.uint16)
    pos = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    huffman.decode_blocks(payloads, counts, lengths, wide, pos)  # the uint16 kernel
    assert np.array_equal(wide, syms)
    assert np.array_equal(_decode_u8(payloads, counts, lengths), syms)


def test_byte_decoder_rejects_damage_and_stays_in_bounds() -> None:
    n = 9 * huffman.LANE_SYMBOLS + 333
    syms, lengths = _skewed(n, 200, 0.08, seed=7)
    assert int(lengths.max()) > 12  # the single-code path runs too
    (payload,) = huffman.encode_blocks(syms, np.array([n]), lengths)
    table = 2 * (-(-n // huffman.LANE_SYMBOLS))
    rng = np.random.default_rng(8)
    rejected = 0
    for _ in range(200):
        bad = bytearray(payload)
        pos = int(rng.integers(table, len(bad)))
        bad[pos] ^= 1 << int(rng.integers(8))
        try:
            got = _decode_u8([bytes(bad)], [n], lengths)
        except huffman.HuffmanError:
            rejected += 1
        else:  # resynchronised onto the stored lane lengths: the crc32 catches these
            assert not np.array_equal(got, syms)
    assert rejected > 0
    for cut in (payload[:-1], payload + b"\0"):
        with pytest.raises(huffman.HuffmanError):
            _decode_u8([cut], [n], lengths)
    bad = bytearray(payload)
    bad[0:2], bad[2:4] = payload[2:4], payload[0:2]
    if bad != payload:
        with pytest.raises(huffman.HuffmanError):
            _decode_u8([bytes(bad)], [n], lengths)


def test_invalid_code_in_incomplete_codebook_is_rejected() -> None:
    lengths = np.array([1, 2, 0], dtype=np.uint8)  # codes 0, 10; "11" starts no code
    n = 4 * huffman.LANE_SYMBOLS
    syms = np.tile(np.array([0, 1], dtype=np.uint8), n // 2)
    (payload,) = huffman.encode_blocks(syms, np.array([n]), lengths)
    assert np.array_equal(_decode_u8([payload], [n], lengths), syms)
    bad = bytearray(payload)
    bad[8 + 100] = 0xFF  # eight 1 bits: "11" is no code
    with pytest.raises(huffman.HuffmanError):
        _decode_u8([bytes(bad)], [n], lengths)


def test_encoder_rejects_symbols_outside_the_codebook() -> None:
    lengths = np.array([1, 1], dtype=np.uint8)
    with pytest.raises(huffman.HuffmanError):
        huffman.encode_blocks(np.array([0, 1, 2], dtype=np.uint8), np.array([3]), lengths)
    # A symbol without a code deep inside a lane (two symbols per lookup, no per-pair branch)
    # and as a lane's odd last symbol (one at a time).
    lengths = np.array([1, 2, 0, 2], dtype=np.uint8)
    for where, n in ((3001, 5000), (1022, 1023), (4, 5)):
        syms = np.tile(np.array([0, 1, 3], dtype=np.uint8), n)[:n]
        assert len(huffman.encode_blocks(syms, np.array([n]), lengths)) == 1
        syms[where] = 2
        with pytest.raises(huffman.HuffmanError):
            huffman.encode_blocks(syms, np.array([n]), lengths)


def test_threads_share_cached_tables() -> None:
    syms, lengths = _skewed(20 * huffman.LANE_SYMBOLS, 21, 0.2, seed=3)
    counts = [len(syms) // 4] * 4
    payloads = huffman.encode_blocks(syms, np.array(counts), lengths)

    def run(_: int) -> bool:
        return bool(np.array_equal(_decode_u8(payloads, counts, lengths), syms))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(16)))


def _zstd_stream(levels: int) -> tuple[StreamSpec, np.ndarray, np.ndarray, entropy.CodedBlocks]:
    spec = StreamSpec.of("v", QuantSettings(v_error_bound=1 / (levels - 1), entropy="zstd"))
    assert spec.levels == levels
    rng = np.random.default_rng(levels)
    counts = np.array([5000, 0, 1, 65536, 777], dtype=np.int64)
    syms = rng.integers(0, levels, int(counts.sum())).astype(entropy.symbol_dtype(levels))
    syms[5001:20000] = syms[20000:34999]  # repeats: zstd matches too, not only literals
    return spec, syms, counts, entropy.encode_symbol_blocks(syms, counts, spec)


@pytest.mark.parametrize("levels", [11, 300])
@pytest.mark.parametrize("native", [True, False])
def test_zstd_blocks_decode_in_one_call_or_block_by_block(
    levels: int, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native and not zstd_native.AVAILABLE:
        pytest.skip("libzstd cannot be loaded here")
    monkeypatch.setattr(zstd_native, "AVAILABLE", native)
    spec, syms, counts, coded = _zstd_stream(levels)
    assert set(coded.coders) == {"zstd"}
    got = entropy.decode_symbol_blocks(coded.coders, coded.payloads, counts, spec, None)
    assert got.dtype == syms.dtype and np.array_equal(got, syms)


@pytest.mark.parametrize("native", [True, False])
def test_damaged_zstd_blocks_are_rejected(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if native and not zstd_native.AVAILABLE:
        pytest.skip("libzstd cannot be loaded here")
    monkeypatch.setattr(zstd_native, "AVAILABLE", native)
    spec, _, counts, coded = _zstd_stream(11)
    good = list(coded.payloads)
    frame = good[3]
    damaged = [frame[:-1], frame[:10], b"", bytes(len(frame))]
    if native:  # python-zstandard ignores bytes after the frame; libzstd does not
        damaged.append(frame + b"\0")
    for bad in damaged:
        payloads = [*good[:3], bad, *good[4:]]
        with pytest.raises(ValueError):
            entropy.decode_symbol_blocks(coded.coders, payloads, counts, spec, None)
    wrong = counts.copy()
    wrong[3] -= 1  # the frame holds one symbol more than the block should
    with pytest.raises(ValueError):
        entropy.decode_symbol_blocks(coded.coders, good, wrong, spec, None)


def test_negative_symbol_counts_never_reach_libzstd() -> None:
    """A count below zero (only a damaged or hostile caller could pass one) would make libzstd
    write past the symbol array: refused before any block is decoded."""
    spec, _, counts, coded = _zstd_stream(11)
    wrong = counts.copy()
    wrong[1] = -wrong[0]  # the running positions step back: block 0 alone overfills `out`
    with pytest.raises(ValueError, match="negative symbol count"):
        entropy.decode_symbol_blocks(coded.coders, coded.payloads, wrong, spec, None)
