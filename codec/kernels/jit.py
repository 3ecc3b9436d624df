"""The numba decorator every codec kernel uses: compiled without the GIL, cached on disk.

Kernels release the GIL (the server encodes and the client decodes on thread pools) and are
cached next to their module; where no cache directory is writable they compile once per process
instead (seconds on first use; `kvpack.codec.warm_up` does it up front).

Integers are int64 throughout the kernels: numba turns mixed uint64/int64 arithmetic into
float64, which would silently lose bits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from numba import njit

F = TypeVar("F", bound=Callable[..., Any])


def _kernel(fn: F) -> F:
    """njit(nogil, cache); without a writable cache location numba refuses `cache=True` at
    decoration time, so fall back to compiling in memory rather than failing the import."""
    try:
        return cast(F, njit(nogil=True, cache=True)(fn))
    except RuntimeError:
        return cast(F, njit(nogil=True)(fn))
