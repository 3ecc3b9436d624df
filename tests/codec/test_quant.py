"""Error-bounded quantisation: the bound holds for every element, windows stay exact."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack.codec import QuantSettings, decode, encode, encode_layer, kernels, quant
from kvpack.codec.layer_codec import encoded_tokens
from tests.codec.quant_reference import group_k, group_v

HALF_ULP_REL = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
HALF_ULP_MIN = {torch.float32: 0.0, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}


def allowed_error(
    groups: torch.Tensor, decoded: torch.Tensor, eb: float, dtype: torch.dtype
) -> torch.Tensor:
    """The documented bound per element of groups [nb, G, m]: step/2 + 2^-21 * max(|mn|, |mx|)
    (fp32 arithmetic) + half an ulp of the output dtype at the decoded value."""
    g = groups.to(torch.float64)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = torch.where(mx > mn, torch.clamp((mx - mn) * eb, min=2.0**-126), 0.0)
    fp32_slop = 2.0**-21 * torch.maximum(mn.abs(), mx.abs())
    out_ulp = HALF_ULP_REL[dtype] * decoded.to(torch.float64).abs() + HALF_ULP_MIN[dtype]
    return step / 2 + fp32_slop + out_ulp


def check_bound(
    x: torch.Tensor, y: torch.Tensor, kind: str, s: QuantSettings, version: int = 2
) -> None:
    """y (decoded) against x (input) of stream `kind`: window tokens exact, every other element
    within the documented bound. Blocks: whole blocks of block_tokens, then (v2 lossy/fixed) one
    short block of the tokens left before the window."""
    window = s.k_window if kind == "k" else s.v_window
    whole = encoded_tokens(x.shape[2], window, s.block_tokens)
    blocked = max(0, x.shape[2] - window) if version >= 2 else whole
    assert torch.equal(x[:, :, blocked:], y[:, :, blocked:]), "window tokens must be exact"
    eb = s.k_error_bound if kind == "k" else s.v_error_bound
    for start, end, t in ((0, whole, s.block_tokens), (whole, blocked, blocked - whole)):
        if end == start:
            continue
        xe, ye = x[:, :, start:end], y[:, :, start:end]
        if kind == "k":
            gx, gy = group_k(xe, s.k_grouping, t), group_k(ye, s.k_grouping, t)
        else:
            gx, gy = group_v(xe, t), group_v(ye, t)
        err = (gx.to(torch.float64) - gy.to(torch.float64)).abs()
        bound = allowed_error(gx, gy, eb, x.dtype)
        assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def caches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, QuantSettings]:
    dtype = draw(DTYPES)
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n, d = draw(st.integers(0, 200)), draw(st.integers(1, 9))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 6e4]))
    if dtype != torch.float16:
        scale = draw(st.sampled_from([scale, 1e30, 1e37]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # Extreme but finite: randn tails times 6e4 would overflow fp16 to inf, which lossy modes
    # reject by design (tested elsewhere); clamp to the dtype's largest finite value instead.
    big = torch.finfo(dtype).max
    k = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * scale).clamp(-big, big)
    v = (torch.rand(b, h, n, d, generator=gen, dtype=torch.float64) * scale - scale / 3).clamp(
        -big, big
    )
    k, v = k.to(dtype), v.to(dtype)
    if draw(st.booleans()) and n:
        k[:, :, : min(n, 64)] = 1.5  # constant groups
        v[:, :, 0] = -2.0
    s = QuantSettings(
        mode=draw(st.sampled_from(["lossy", "fixed"])),
        k_error_bound=draw(st.sampled_from([2.0**-12, 0.013, 0.05, 0.3, 1.0])),
        v_error_bound=draw(st.sampled_from([0.01, 0.1, 0.5])),
        k_grouping=draw(st.sampled_from(["channel", "block"])),
        block_tokens=draw(st.sampled_from([16, 64])),
        k_window=draw(st.sampled_from([0, 5, 128])),
        v_window=draw(st.sampled_from([0, 33, 256])),
        entropy=draw(st.sampled_from(["auto", "huffman", "zstd"])),
    )
    return k, v, s


@settings(max_examples=60, deadline=None)
@given(caches())
def test_error_bound_every_element(case: tuple[torch.Tensor, torch.Tensor, QuantSettings]) -> None:
    k, v, s = case
    out = decode(encode([k], [v], settings=s))
    assert out.keys[0].dtype == k.dtype and out.keys[0].shape == k.shape
    check_bound(k, out.keys[0], "k", s)
    check_bound(v, out.values[0], "v", s)


def test_levels_match_reference_sweeps() -> None:
    assert quant.levels(0.05) == 21
    assert quant.levels(0.1) == 11
    assert quant.levels(1.0) == 2
    assert quant.fixed_bits(21) == 5 and quant.fixed_bits(11) == 4 and quant.fixed_bits(2) == 1


def test_constant_groups_are_exact_and_cost_no_symbols() -> None:
    k = torch.full((1, 2, 192, 8), 0.3, dtype=torch.float16)
    layer = encode_layer(k, k.clone(), settings=QuantSettings(k_window=0, v_window=0))
    assert layer.stats is not None and layer.stats.symbols == 0
    out = decode(encode([k], [k.clone()], settings=QuantSettings(k_window=0, v_window=0)))
    assert torch.equal(out.keys[0], k) and torch.equal(out.values[0], k)


def test_stats_report_errors_and_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 400, 16, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 2, 400, 16, generator=gen).to(torch.bfloat16)
    # The newest 128 K / 256 V tokens exact (the defaults before format v2 made them 0).
    stats = encode_layer(k, v, settings=QuantSettings(k_window=128, v_window=256)).stats
    assert stats is not None
    assert 0 < stats.key_max_abs_error < 0.5 and 0 < stats.value_rel_error < 0.1
    assert stats.symbols > 0 and stats.coded_bits >= 0.98 * stats.entropy_bits
    assert stats.stored_bytes < stats.raw_bytes


def test_non_finite_input_is_rejected_in_lossy_modes() -> None:
    k = torch.zeros(1, 1, 64, 4)
    k[0, 0, 3, 1] = math.inf
    with pytest.raises(ValueError, match="lossless"):
        encode([k], [torch.zeros_like(k)], settings=QuantSettings(k_window=0))


def test_fixed_width_pack_round_trip() -> None:
    rng = np.random.default_rng(0)
    for bits in (1, 4, 5, 12):
        sym = rng.integers(0, 1 << bits, 1001).astype(np.uint16)
        packed = quant.pack_fixed(sym, bits)
        assert len(packed) == (1001 * bits + 7) // 8
        assert np.array_equal(quant.unpack_fixed(packed, 1001, bits), sym)


def test_settings_validate_and_wire_round_trip() -> None:
    s = QuantSettings(k_error_bound=0.07, k_window=0, entropy="zstd")
    assert QuantSettings.from_mapping(s.to_dict()) == s
    assert QuantSettings.from_mapping({"k_window": " 12 ", "v_error_bound": "0.2"}).k_window == 12
    for bad, field in (
        ({"mode": "lossyy"}, "mode"),
        ({"k_error_bound": "0"}, "k_error_bound"),
        ({"block_tokens": "0"}, "block_tokens"),
        ({"k_window": "x"}, "k_window"),
        ({"nope": "1"}, "nope"),
    ):
        with pytest.raises(ValueError, match=field):
            QuantSettings.from_mapping(bad)


@pytest.mark.parametrize("eb", [2.0**-12, 0.013, 0.05, 0.1, 0.25, 1 / 3, 1.0])
def test_v2_lattice_step_and_anchor_keep_the_bound(eb: float) -> None:
    """Format v2's compact step never exceeds eb * range, and its anchor puts the group's
    minimum and maximum within half a step of the symbols' reach; constant groups and groups
    the codes cannot describe are escapes that keep fp32 values (docs/FORMAT.md)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 64, 16, generator=gen) * torch.logspace(-3, 3, 16) + 7.0
    x[0, 0, :16] = 0.25  # constant V groups (tokens) and K channel groups (block 0)
    qmax = quant.levels(eb) - 1
    for grouping in ("v", "channel", "block"):
        qz = quant.quantize_blocks(x, grouping, 16, eb, lattice=True)
        ref = quant.quantize_blocks(x, grouping, 16, eb)  # v1: exact minima and steps
        assert qz.step_codes is not None and ref.step_codes is None
        esc = qz.step_codes == kernels.ESCAPE
        mn, st = qz.mn.astype(np.float64), qz.step.astype(np.float64)
        lo, st1 = ref.mn.astype(np.float64), ref.step.astype(np.float64)
        hi = lo + st1 / eb  # the group maximum, to fp32 rounding of the v1 step
        assert (st <= st1).all() and np.array_equal(mn[esc], lo[esc])
        live = ~esc & (st1 > 0)
        slack = 1e-6 * np.maximum(abs(lo), abs(hi))
        assert (mn[live] - st[live] / 2 <= lo[live] + slack[live]).all()
        assert (mn[live] + (qmax + 0.5) * st[live] >= hi[live] - slack[live]).all()
        assert (esc[st1 == 0]).all()  # constant groups stay exact
        if eb >= 0.05:  # escapes only where the anchor is over 4096 steps from 0 (int16 codes)
            assert not esc[(st1 > 0) & (abs(lo) < 4000 * st1)].any()


def test_step_grid_matches_the_format_document() -> None:
    """The v2 step mantissas are normative: docs/FORMAT.md lists their fp32 bits."""
    doc = (Path(__file__).parents[2] / "docs" / "FORMAT.md").read_text()
    rows = re.findall(r"^\| (\d+)–(\d+) \| ((?:[0-9a-f]{8} ?){8}) \|$", doc, flags=re.M)
    listed = [int(h, 16) for _, _, hexes in rows for h in hexes.split()]
    assert listed == kernels.STEP_MANTISSAS.view(np.uint32).tolist()
    assert len(listed) == 64 and listed[0] == 0x3F800000  # M[0] = 1.0
