"""Unaligned multi-byte loads and stores on uint8 arrays for the Huffman kernels.

numba only indexes an array element by element, so a 64-bit big-endian read of a bit stream
costs eight loads and shifts. These intrinsics are one unaligned LLVM load or store (plus a
byte swap where the stream is big-endian): x86 and ARMv8 do unaligned accesses natively.

No bounds checks: every caller keeps its index at least 8 bytes (4 for store_u32) inside the
array, which the callers' buffers guarantee with explicit slack (see huffman.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from llvmlite import ir  # type: ignore[import-untyped]
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_intrinsic = cast(Callable[[Callable[..., Any]], Any], intrinsic)


def _byte_pointer(context: Any, builder: Any, arrty: Any, arr: Any, idx: Any) -> Any:
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(
        context, builder, arrty, ary, [idx], wraparound=False, boundscheck=False
    )


@_intrinsic
def load_be64(typingctx: Any, arr: Any, idx: Any) -> Any:
    """int64 of the 8 bytes arr[idx:idx+8] read big-endian (arr: uint8 1-D)."""
    sig = types.int64(arr, idx)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _byte_pointer(context, builder, signature.args[0], args[0], args[1])
        i64 = ir.IntType(64)
        value = builder.load(builder.bitcast(ptr, i64.as_pointer()), align=1)
        return builder.bswap(value)

    return sig, codegen


@_intrinsic
def store_be64(typingctx: Any, arr: Any, idx: Any, value: Any) -> Any:
    """arr[idx:idx+8] = the int64 `value` written big-endian (arr: uint8 1-D)."""
    sig = types.void(arr, idx, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _byte_pointer(context, builder, signature.args[0], args[0], args[1])
        i64 = ir.IntType(64)
        builder.store(builder.bswap(args[2]), builder.bitcast(ptr, i64.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@_intrinsic
def store_u32(typingctx: Any, arr: Any, idx: Any, value: Any) -> Any:
    """arr[idx:idx+4] = the low 32 bits of int64 `value`, little-endian (arr: uint8 1-D): the
    byte at arr[idx] is value & 0xFF."""
    sig = types.void(arr, idx, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = _byte_pointer(context, builder, signature.args[0], args[0], args[1])
        i32 = ir.IntType(32)
        low = builder.trunc(args[2], i32)
        builder.store(low, builder.bitcast(ptr, i32.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen
