"""Group metadata of quantised blocks: the compact anchors and steps of container format v2 and
the fp32 minima and steps of format v1 (docs/FORMAT.md "Group metadata").

v1 stores per group an fp32 minimum and an fp32 step: 64 bits, 1-2 bits per value when groups
hold 32-64 values. v2 stores a step code (the step on a grid of 64 steps per octave, rounded
down) and an anchor code (symbol 0's value on the lattice of step/8), 32 bits as they are and
about 8-12 after zstd; groups where that does not fit (constant groups, tiny error bounds) are
escapes stored as fp32 like v1.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import zstandard

from kvpack.codec import kernels, lossless
from kvpack.codec.quant import Quantized

RAW, ZSTD = 1, 2  # v2 metadata formats: the first byte of a quantised block
_U32 = struct.Struct("<I")
_MANTISSA_BITS = kernels.STEP_MANTISSAS.view(np.uint32).astype(np.int64)
# Valid step codes: exponent in [-123, 127] (kernels.floats STEP_MIN_EXP), or ESCAPE.
_MIN_CODE = (-123 + kernels.STEP_EXP_BIAS) * 64
_MAX_CODE = (127 + kernels.STEP_EXP_BIAS) * 64 + 63
_ZSTD_LEVEL = 3


def _zstd() -> zstandard.ZstdCompressor:
    return lossless.per_thread(
        "meta_zc",
        lambda: zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True),
    )


def _body(
    step_codes: np.ndarray, anchor_codes: np.ndarray, mn: np.ndarray, step: np.ndarray
) -> bytes:
    """One block's RAW metadata: the byte planes of the step codes (low bytes, then high), of
    the anchor codes, then the escaped groups' fp32 minima and fp32 steps, all little-endian."""
    esc = step_codes == kernels.ESCAPE
    sc = step_codes.astype("<u2").view(np.uint8).reshape(-1, 2)
    ac = anchor_codes.astype("<i2").view(np.uint8).reshape(-1, 2)
    return b"".join(
        [
            np.ascontiguousarray(sc.T).tobytes(),
            np.ascontiguousarray(ac.T).tobytes(),
            mn[esc].astype("<f4").tobytes(),
            step[esc].astype("<f4").tobytes(),
        ]
    )


def encode_v2(qz: Quantized, compress: bool) -> list[bytes]:
    """Per block, its v2 metadata header: RAW, or ZSTD (u32 LE frame length, then a zstd frame
    of the RAW body) where `compress` and that is smaller. qz must come from
    quant.quantize_blocks(..., lattice=True)."""
    assert qz.step_codes is not None and qz.anchor_codes is not None
    out = []
    zc = _zstd() if compress else None
    for i in range(qz.mn.shape[0]):
        body = _body(qz.step_codes[i], qz.anchor_codes[i], qz.mn[i], qz.step[i])
        head = bytes([RAW]) + body
        if zc is not None:
            frame = zc.compress(body)
            if 5 + len(frame) < len(head):
                head = bytes([ZSTD]) + _U32.pack(len(frame)) + frame
        out.append(head)
    return out


def encode_v1(qz: Quantized) -> list[bytes]:
    """Per block, its v1 metadata: G fp32 minima then G fp32 steps (LE)."""
    meta = np.concatenate([qz.mn, qz.step], axis=1).astype("<f4", copy=False)
    return [meta[i].tobytes() for i in range(meta.shape[0])]


def _parse_body(
    body: bytes | memoryview, g: int, exact: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """(anchors, steps) float32 [g] and the body's length from a RAW body (at least its
    prefix); `exact`: the body must be exactly that long. ValueError when malformed."""
    if len(body) < 4 * g:
        raise ValueError(f"cannot hold {g} step and anchor codes")
    planes = np.frombuffer(body, dtype=np.uint8, count=4 * g)
    codes = planes[:g].astype(np.int64) | (planes[g : 2 * g].astype(np.int64) << 8)
    anchors_j = planes[2 * g : 3 * g].astype(np.uint16) | (planes[3 * g :].astype(np.uint16) << 8)
    anchors_j = anchors_j.view(np.int16).astype(np.int64)
    esc = codes == kernels.ESCAPE
    n_esc = int(esc.sum())
    size = 4 * g + 8 * n_esc
    if len(body) < size or (exact and len(body) != size):
        raise ValueError(f"metadata of {len(body)} bytes, {n_esc} escaped groups need {size}")
    live = ~esc
    bad = live & ((codes < _MIN_CODE) | (codes > _MAX_CODE))
    if bad.any():
        raise ValueError(
            f"group {int(np.argmax(bad))}: step code {int(codes[bad][0])} out of range"
        )
    steps = np.zeros(g, dtype=np.float32)
    anchors = np.zeros(g, dtype=np.float32)
    c = codes[live]
    # Mantissas in [1, 2): the exponent adds to their bits (kernels.floats.step_of_code).
    bits = _MANTISSA_BITS[c & 63] + (((c >> 6) - kernels.STEP_EXP_BIAS) << 23)
    steps[live] = bits.astype(np.uint32).view(np.float32)
    unit = steps[live] / np.float32(kernels.ANCHOR_DIVISOR)
    with np.errstate(over="ignore"):
        anchors[live] = anchors_j[live].astype(np.float32) * unit
    if n_esc:
        fp = np.frombuffer(body, dtype="<f4", count=2 * n_esc, offset=4 * g)
        anchors[esc] = fp[:n_esc]
        steps[esc] = fp[n_esc:]
    return anchors, steps, size


def decode_meta(
    blocks: Sequence[bytes | memoryview], g: int, version: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(anchors float32 [nb, G], steps float32 [nb, G], metadata bytes per block) of quantised
    block sections of container `version`. ValueError naming the first bad block: too short, an
    unknown metadata format, a zstd frame that does not decode to its body, a code out of
    range, a non-finite anchor or step, a negative step."""
    nb = len(blocks)
    if version == 1:
        head = 8 * g
        short = [i for i, data in enumerate(blocks) if len(data) < head]
        if short:
            raise ValueError(f"block {short[0]}: cannot hold {g} group minima and steps")
        raw = b"".join([data[:head] for data in blocks])
        meta = np.frombuffer(raw, dtype="<f4").reshape(nb, 2 * g).astype(np.float32)
        mn, step, heads = meta[:, :g], meta[:, g:], [head] * nb
    else:
        mn = np.empty((nb, g), dtype=np.float32)
        step = np.empty((nb, g), dtype=np.float32)
        heads = []
        for i, data in enumerate(blocks):
            try:
                if len(data) < 1:
                    raise ValueError("empty block")
                fmt = data[0]
                if fmt == RAW:
                    mn[i], step[i], size = _parse_body(data[1:], g, exact=False)
                    heads.append(1 + size)
                elif fmt == ZSTD:
                    if len(data) < 5:
                        raise ValueError("truncated metadata frame length")
                    (flen,) = _U32.unpack_from(data, 1)
                    if 5 + flen > len(data):
                        raise ValueError(f"metadata frame of {flen} bytes exceeds the block")
                    body = lossless.zstd_bounded(data[5 : 5 + flen], 12 * g)
                    mn[i], step[i], _ = _parse_body(body, g, exact=True)
                    heads.append(5 + flen)
                else:
                    raise ValueError(f"unknown metadata format {fmt}")
            except ValueError as err:
                raise ValueError(f"block {i}: {err}") from None
    bad = ~np.isfinite(mn).all(axis=1) | ~np.isfinite(step).all(axis=1) | (step < 0).any(axis=1)
    if bad.any():
        raise ValueError(f"block {int(np.argmax(bad))}: non-finite group minimum or negative step")
    return mn, step, heads
