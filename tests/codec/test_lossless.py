"""Lossless mode and raw tensor bytes: exact round trips, bf16 through uint8 views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codec import (
    QuantSettings,
    decode,
    dtype_from_name,
    dtype_name,
    encode,
    lossless,
    tensor_from_bytes,
    tensor_to_bytes,
)


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int64", "int32", "uint8"])
def test_raw_bytes_round_trip(name: str) -> None:
    dtype = dtype_from_name(name)
    assert dtype_name(dtype) == name
    t = (torch.arange(-30, 30) * 7).to(dtype).reshape(3, 4, 5)
    raw = tensor_to_bytes(t.permute(2, 0, 1))  # non-contiguous input
    back = tensor_from_bytes(raw, name, (5, 3, 4))
    assert torch.equal(back, t.permute(2, 0, 1))
    with pytest.raises(ValueError):
        tensor_from_bytes(raw[:-1], name, (5, 3, 4))


def test_raw_bytes_are_little_endian() -> None:
    assert tensor_to_bytes(torch.tensor([1.0], dtype=torch.bfloat16)) == b"\x80\x3f"
    assert tensor_to_bytes(torch.tensor([258], dtype=torch.int32)) == b"\x02\x01\x00\x00"


def test_shuffle_compress_round_trip_and_size_check() -> None:
    data = np.random.default_rng(0).standard_normal(1000).astype(np.float16).tobytes()
    packed = lossless.shuffle_compress(data, 2)
    assert lossless.unshuffle_decompress(packed, 2, len(data)) == data
    with pytest.raises(lossless.LosslessError):
        lossless.unshuffle_decompress(packed, 2, len(data) + 2)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.integers(0, 150),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0, 64]),
)
def test_lossless_mode_exact_bytes(dtype: torch.dtype, n: int, seed: int, window: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, n, 8, generator=gen).to(dtype)
    v = torch.randn(1, 2, n, 4, generator=gen).to(dtype)
    if n:
        k[0, 0, 0, 0] = math.nan
        v[0, 1, -1, 2] = -math.inf
    s = QuantSettings(mode="lossless", k_window=window, v_window=window)
    out = decode(encode([k], [v], settings=s))
    assert tensor_to_bytes(out.keys[0]) == tensor_to_bytes(k)
    assert tensor_to_bytes(out.values[0]) == tensor_to_bytes(v)
