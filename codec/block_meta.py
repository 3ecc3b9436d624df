"""Group metadata of quantised blocks: the compact anchors and steps of container format v2 and
the fp32 minima and steps of format v1 (docs/FORMAT.md "Group metadata").

v1 stores per group an fp32 minimum and an fp32 step at the start of each block: 64 bits, 1-2
bits per value when groups hold 32-64 values. v2 stores per group a step code (the step on a
grid of 64 steps per octave, rounded down) and an anchor code (symbol 0's value on the lattice
of step/8), 32 bits as they are, for all blocks of a stream in one metadata section; in lossy
mode that section is one zstd frame (11-16 bits per group on the KV caches measured: one frame per
stream compresses a third better than one per block, measured in docs/FORMAT.md). Groups where
the codes do not fit (constant groups, tiny error bounds) are escapes stored as fp32 like v1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from kvpack.codec import kernels, lossless
from kvpack.codec.quant import Quantized

META_CODERS = ("meta-raw", "meta-zstd", "meta-fp32")  # v2 stream metadata sections
_MANTISSA_BITS32 = kernels.STEP_MANTISSAS.view(np.int32)
# Valid step codes: exponent in [-123, 127] (kernels.floats STEP_MIN_EXP), or ESCAPE.
_MIN_CODE = (-123 + kernels.STEP_EXP_BIAS) * 64
_MAX_CODE = (127 + kernels.STEP_EXP_BIAS) * 64 + 63
_ZSTD_LEVEL = 3


def _zstd() -> zstandard.ZstdCompressor:
    return lossless.per_thread(
        "meta_zc",
        lambda: zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True),
    )


def _planes(codes: np.ndarray) -> bytes:
    """16-bit codes as two byte planes: every low byte, then every high byte."""
    pairs = np.ascontiguousarray(codes).reshape(-1).astype("<u2").view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(pairs.T).tobytes()


@dataclass(frozen=True)
class StreamCodes:
    """A stream's v2 group metadata as codes, every group of every block in block-major group
    order: step codes (uint16 [N], ESCAPE = escaped), anchor codes (int16 [N]) and the escaped
    groups' fp32 minima and steps (float32 [E]). Blocks may differ in groups (a short last V
    block has fewer): the caller knows each block's count."""

    step_codes: np.ndarray
    anchor_codes: np.ndarray
    escaped_mn: np.ndarray
    escaped_step: np.ndarray

    @staticmethod
    def of(qz: Quantized) -> StreamCodes:
        """The codes of quantize_blocks(..., lattice=True)'s result."""
        assert qz.step_codes is not None and qz.anchor_codes is not None
        esc = qz.step_codes == kernels.ESCAPE
        return StreamCodes(
            qz.step_codes.reshape(-1), qz.anchor_codes.reshape(-1), qz.mn[esc], qz.step[esc]
        )

    def __add__(self, more: StreamCodes) -> StreamCodes:
        """The codes of this stream's blocks followed by `more`'s (appending blocks)."""
        return StreamCodes(
            np.concatenate([self.step_codes, more.step_codes]),
            np.concatenate([self.anchor_codes, more.anchor_codes]),
            np.concatenate([self.escaped_mn, more.escaped_mn]),
            np.concatenate([self.escaped_step, more.escaped_step]),
        )

    def encode(self, compress: bool) -> tuple[str, bytes]:
        """(coder, bytes) of the stream's metadata section, the smallest of: the byte planes of
        the step codes (block-major), of the anchor codes, then the escaped groups' fp32 minima
        and fp32 steps, little-endian ("meta-raw"); one zstd frame of those bytes ("meta-zstd",
        where `compress`); every group's fp32 anchor then every group's fp32 step ("meta-fp32",
        where escapes make the codes larger: so no stream's metadata exceeds v1's 8 bytes per
        group, which size bounds such as LMCache's rely on)."""
        body = b"".join(
            [
                _planes(self.step_codes),
                _planes(self.anchor_codes),
                self.escaped_mn.astype("<f4").tobytes(),
                self.escaped_step.astype("<f4").tobytes(),
            ]
        )
        best = ("meta-raw", body)
        if len(body) > 8 * len(self.step_codes):
            mn, step = self.values()
            best = ("meta-fp32", mn.astype("<f4").tobytes() + step.astype("<f4").tobytes())
        if compress and body:
            frame = _zstd().compress(body)
            if len(frame) < len(best[1]):
                best = ("meta-zstd", frame)
        return best

    @staticmethod
    def decode(coder: str, data: bytes | memoryview, n: int) -> StreamCodes:
        """Parse a metadata section of n groups. ValueError unless it holds exactly the codes
        and their escapes, with every step code in range."""
        if coder == "meta-fp32":
            if len(data) != 8 * n:
                raise ValueError(f"fp32 metadata of {len(data)} bytes, {n} groups need {8 * n}")
            fp = np.frombuffer(data, dtype="<f4").astype(np.float32)
            every = np.full(n, kernels.ESCAPE, dtype=np.uint16)
            return StreamCodes(every, np.zeros(n, dtype=np.int16), fp[:n], fp[n:])
        if coder == "meta-zstd":
            body: bytes | memoryview = lossless.zstd_bounded(data, 12 * n)
        elif coder == "meta-raw":
            body = data
        else:
            raise ValueError(f"unknown metadata coder {coder!r}")
        if len(body) < 4 * n:
            raise ValueError(f"metadata of {len(body)} bytes cannot hold {n} step and anchor codes")
        planes = np.frombuffer(body, dtype=np.uint8, count=4 * n).astype(np.uint16)
        step_codes = planes[:n] | (planes[n : 2 * n] << 8)
        anchor_codes = (planes[2 * n : 3 * n] | (planes[3 * n :] << 8)).view(np.int16)
        esc = step_codes == kernels.ESCAPE
        n_esc = int(esc.sum())
        if len(body) != 4 * n + 8 * n_esc:
            raise ValueError(
                f"metadata of {len(body)} bytes, {n} groups with {n_esc} escapes need "
                f"{4 * n + 8 * n_esc}"
            )
        bad = ~esc & ((step_codes < _MIN_CODE) | (step_codes > _MAX_CODE))
        if bad.any():
            first = int(np.argmax(bad))
            raise ValueError(f"group {first}: step code {int(step_codes[first])} out of range")
        fp = np.frombuffer(body, dtype="<f4", count=2 * n_esc, offset=4 * n).astype(np.float32)
        return StreamCodes(step_codes, anchor_codes, fp[:n_esc], fp[n_esc:])

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """(anchors, steps) float32 [N] as the kernels use them (exactly the encoder's).
        ValueError naming the first group with a non-finite anchor or step, or a negative
        step."""
        codes = self.step_codes.astype(np.int32)
        esc = codes == kernels.ESCAPE
        # Mantissas in [1, 2): the exponent adds to their bits (kernels.floats.step_of_code).
        # Computed for every group in whole-array passes (escapes get junk, replaced below):
        # masked selections cost more than the arithmetic.
        bits = _MANTISSA_BITS32[codes & 63] + (((codes >> 6) - kernels.STEP_EXP_BIAS) << 23)
        steps = bits.view(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            anchors = self.anchor_codes.astype(np.float32) * (
                steps / np.float32(kernels.ANCHOR_DIVISOR)
            )
        n_esc = len(self.escaped_mn)
        if n_esc:
            anchors[esc] = self.escaped_mn
            steps[esc] = self.escaped_step
            bad = ~np.isfinite(anchors) | ~np.isfinite(steps) | (steps < 0)
        else:  # steps from codes are finite and positive; only an anchor can overflow
            bad = ~np.isfinite(anchors)
        if bad.any():
            raise ValueError(
                f"group {int(np.argmax(bad))}: non-finite group minimum or negative step"
            )
        return anchors, steps


def encode_v1(qz: Quantized) -> list[bytes]:
    """Per block, its v1 metadata: G fp32 minima then G fp32 steps (LE)."""
    meta = np.concatenate([qz.mn, qz.step], axis=1).astype("<f4", copy=False)
    return [meta[i].tobytes() for i in range(meta.shape[0])]


def check_values(mn: np.ndarray, step: np.ndarray) -> None:
    """ValueError naming the first block [nb, G] with a non-finite anchor or step, or a negative
    step."""
    bad = ~np.isfinite(mn).all(axis=1) | ~np.isfinite(step).all(axis=1) | (step < 0).any(axis=1)
    if bad.any():
        raise ValueError(f"block {int(np.argmax(bad))}: non-finite group minimum or negative step")


def decode_v1(blocks: Sequence[bytes | memoryview], g: int) -> tuple[np.ndarray, np.ndarray]:
    """(minima, steps) float32 [nb, G] from v1 block sections (G fp32 minima, G fp32 steps
    first in each). ValueError naming the first bad block."""
    head = 8 * g
    short = [i for i, data in enumerate(blocks) if len(data) < head]
    if short:
        raise ValueError(f"block {short[0]}: cannot hold {g} group minima and steps")
    raw = b"".join([data[:head] for data in blocks])
    meta = np.frombuffer(raw, dtype="<f4").reshape(len(blocks), 2 * g).astype(np.float32)
    mn, step = meta[:, :g], meta[:, g:]
    check_values(mn, step)
    return mn, step
