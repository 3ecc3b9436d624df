"""numba kernels: bit streams equal plain-Python reference encoders; corrupt input is rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codec import huffman, kernels, quant
from tests.codec import quant_reference as reference
from tests.codec.quant_reference import group_k, group_v


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


QUANT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_blocks(
    rng: np.random.Generator, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """Values of many magnitudes (up to half the dtype's largest, so ranges fit fp32), ±0, ties
    and constant groups."""
    big = torch.finfo(dtype).max / 2
    scale = 10.0 ** rng.uniform(-40, 40, shape) * rng.standard_normal(shape)
    x = torch.from_numpy(scale).clamp(-big, big)
    x[torch.from_numpy(rng.random(shape) < 0.1)] = 0.0
    x[torch.from_numpy(rng.random(shape) < 0.1)] = -0.0
    x[:, :, : shape[2] // 3] = 1.25  # whole blocks of constant groups
    x[:, :, -1] = torch.from_numpy(rng.integers(-3, 4, (shape[0], shape[1], shape[3])) * 0.5)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
@pytest.mark.parametrize("grouping", ["v", "channel", "block"])
@pytest.mark.parametrize("eb", [2.0**-12, 0.05, 0.3, 1.0])
def test_quantize_kernels_equal_torch_reference(
    dtype: torch.dtype, grouping: str, eb: float
) -> None:
    rng = np.random.default_rng(hash((str(dtype), grouping, eb)) % 2**32)
    # (.., 32, 32): a square tile, where token and channel groups have the same count.
    shapes = [
        (1, 1, 1, 1, 1),
        (2, 3, 3, 16, 5),
        (1, 2, 2, 64, 8),
        (2, 1, 1, 7, 33),
        (1, 2, 2, 32, 32),
    ]
    for b, h, nb, t, d in shapes:
        x = random_blocks(rng, dtype, (b, h, nb * t, d))
        if d > 1:  # strided input (channels outermost in memory)
            x = x.transpose(2, 3).contiguous().transpose(2, 3)
        groups = group_v(x, t) if grouping == "v" else group_k(x, grouping, t)
        q, mn, step = reference.quantize(groups.to(torch.float32), eb)
        got = quant.quantize_blocks(x, grouping, t, eb)
        live = (step != 0).numpy()
        # The sign of a zero minimum is unspecified (torch's vectorised amin picks either);
        # both decode alike, so minima compare by value, steps and symbols bit for bit.
        assert np.array_equal(got.mn, mn.numpy())
        assert np.array_equal(got.step.view(np.uint32), step.numpy().view(np.uint32))
        want = q.numpy().astype(np.int64)[live].reshape(-1)
        assert np.array_equal(got.symbols.astype(np.int64), want)
        assert np.array_equal(got.counts, live.sum(axis=1) * groups.shape[-1])
        levels = quant.levels(eb)
        hist = np.array(
            [
                np.bincount(want_blk, minlength=levels)
                for want_blk in np.split(want, np.cumsum(got.counts)[:-1])
            ]
        )
        assert np.array_equal(got.hist, hist)
        # Decoding writes exactly what the torch dequantise + ungroup wrote.
        ref_x = reference.dequantize(q, mn, step, dtype)
        out = torch.full_like(x, float("nan"))
        quant.dequantize_blocks(
            got.symbols.astype(np.uint16), got.mn, got.step, grouping, levels, out
        )
        got_x = group_v(out, t) if grouping == "v" else group_k(out, grouping, t)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got_x.view(bits), ref_x.view(bits))
        # Error statistics: max |x - x̂| over the decoded values; squares in float64.
        err = (ref_x.to(torch.float64) - groups.to(torch.float64)).abs()
        assert got.max_err == (float(err.max()) if err.numel() else 0.0)
        assert got.sq_err == pytest.approx(float(err.square().sum()), rel=1e-9, abs=0)
        assert got.sq_norm == pytest.approx(
            float(groups.to(torch.float64).square().sum()), rel=1e-9
        )


def test_quantize_kernel_rejects_non_finite_and_out_of_range_symbols() -> None:
    x = torch.ones(1, 1, 4, 2)
    for bad in (float("inf"), float("nan")):
        y = x.clone()
        y[0, 0, 1, 1] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quant.quantize_blocks(y, "v", 2, 0.1)
    y = torch.tensor([-3e38, 3e38]).reshape(1, 1, 1, 2)  # range overflows fp32
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize_blocks(y, "v", 1, 0.1)
    qz = quant.quantize_blocks(torch.arange(8.0).reshape(1, 1, 4, 2), "v", 2, 0.1)
    syms = qz.symbols.astype(np.uint16)
    syms[-1] = 11
    with pytest.raises(ValueError, match="block 1: symbol outside 11 levels"):
        quant.dequantize_blocks(syms, qz.mn, qz.step, "v", 11, torch.empty(1, 1, 4, 2))
