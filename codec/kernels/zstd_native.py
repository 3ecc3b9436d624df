"""zstd decompression of all of a stream's symbol blocks in one compiled call, straight into the
symbol array: libzstd's C functions called from the kernel by address.

Through python-zstandard every block costs a Python call, a bytes object and a copy of it into
the symbol array (about a sixth of a block's decode time, and the GIL held in between). Here one
nogil kernel loops over the blocks and libzstd writes each one where it belongs.

libzstd is the system's shared library (libzstd.so.1: Debian and Ubuntu install it with dpkg,
so the python:*-slim images have it). Where it cannot be loaded, or is older than 1.4 (the
first with ZSTD_findFrameCompressedSize and ZSTD_decompressDCtx as stable API), AVAILABLE is
False and callers keep python-zstandard. The functions are passed to the kernel as integer
addresses, so the kernel itself stays in numba's on-disk cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.extending import intrinsic

from kvpack.codec.kernels.jit import _kernel

_intrinsic = cast(Callable[[Callable[..., Any]], Any], intrinsic)


def _load() -> ctypes.CDLL | None:
    names = ["libzstd.so.1", ctypes.util.find_library("zstd")]
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.ZSTD_versionNumber.restype = ctypes.c_uint
            if lib.ZSTD_versionNumber() < 10400:
                continue
            return lib
        except (OSError, AttributeError):
            continue
    return None


_LIB = _load() if sys.byteorder == "little" else None  # uint16 symbols are stored LE
AVAILABLE = _LIB is not None


def _address(name: str) -> int:
    assert _LIB is not None
    return int(ctypes.cast(getattr(_LIB, name), ctypes.c_void_p).value or 0)


DECOMPRESS_DCTX = _address("ZSTD_decompressDCtx") if AVAILABLE else 0
FRAME_SIZE = _address("ZSTD_findFrameCompressedSize") if AVAILABLE else 0

if _LIB is not None:
    _LIB.ZSTD_createDCtx.restype = ctypes.c_void_p
    _LIB.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]


class _Context:
    """One ZSTD_DCtx (not thread-safe: one per thread), freed with its thread's locals."""

    def __init__(self) -> None:
        assert _LIB is not None
        self.ptr = int(_LIB.ZSTD_createDCtx() or 0)
        if not self.ptr:
            raise MemoryError("ZSTD_createDCtx failed")

    def __del__(self) -> None:
        if _LIB is not None and self.ptr:
            _LIB.ZSTD_freeDCtx(self.ptr)


_local = threading.local()


def context() -> int:
    """This thread's ZSTD_DCtx address (created on first use)."""
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        ctx = _local.ctx = _Context()
    return int(ctx.ptr)


def _call(builder: Any, fn: Any, args: list[Any]) -> Any:
    """Call the C function at integer address `fn` taking and returning size_t (int64 here:
    pointers and sizes are all 64-bit integers in the x86-64 and AArch64 calling conventions)."""
    i64 = ir.IntType(64)
    fnty = ir.FunctionType(i64, [i64] * len(args))
    return builder.call(builder.inttoptr(fn, fnty.as_pointer()), args)


@_intrinsic
def _call2(typingctx: Any, fn: Any, a: Any, b: Any) -> Any:
    sig = types.int64(types.int64, types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return _call(builder, args[0], list(args[1:]))

    return sig, codegen


@_intrinsic
def _call5(typingctx: Any, fn: Any, a: Any, b: Any, c: Any, d: Any, e: Any) -> Any:
    sig = types.int64(*([types.int64] * 6))

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return _call(builder, args[0], list(args[1:]))

    return sig, codegen


@_kernel
def zstd_decode_blocks(
    decompress: int,
    frame_size: int,
    dctx: int,
    buf: np.ndarray,
    offsets: np.ndarray,
    nbytes: np.ndarray,
    out: np.ndarray,
    out_pos: np.ndarray,
) -> int:
    """Decompress block b, the single zstd frame buf[offsets[b]:offsets[b+1]] (uint8), into
    the nbytes[b] bytes of `out` (uint8, or uint16 holding LE symbols) starting at element
    out_pos[b]. decompress / frame_size: addresses of ZSTD_decompressDCtx and
    ZSTD_findFrameCompressedSize; dctx: a ZSTD_DCtx of this thread.

    Returns -1, or the first block that is not exactly one frame decoding to exactly nbytes[b]
    bytes (libzstd writes nothing past the bytes given to it; zstd error codes are huge size_t
    values, negative here, so they never equal a size)."""
    src = buf.ctypes.data
    dst = out.ctypes.data
    width = out.itemsize
    for b in range(len(nbytes)):
        start = src + offsets[b]
        size = offsets[b + 1] - offsets[b]
        if _call2(frame_size, start, size) != size:
            return b
        n = nbytes[b]
        got = _call5(decompress, dctx, dst + out_pos[b] * width, n, start, size)
        if got != n:
            return b
    return -1
