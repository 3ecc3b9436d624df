"""numba kernels for the codec's per-symbol loops, one module per concern: Huffman encode and
decode, fixed-width bit packing, histograms, quantisation and dequantisation (and the float
helpers they share).

Each kernel is one compiled pass over a whole stream's blocks, releasing the GIL (jit.py). The
kernels import nothing else from the codec; the Python wrappers (huffman.py, quant.py,
entropy.py) import them.
"""

from __future__ import annotations

from typing import Any

from kvpack.codec.kernels.bitpack import pack_fixed as pack_fixed
from kvpack.codec.kernels.bitpack import pack_fixed_blocks as pack_fixed_blocks
from kvpack.codec.kernels.bitpack import unpack_fixed as unpack_fixed
from kvpack.codec.kernels.bitpack import unpack_fixed_blocks as unpack_fixed_blocks
from kvpack.codec.kernels.dequantize import dequantize_blocks as dequantize_blocks
from kvpack.codec.kernels.floats import ANCHOR_DIVISOR as ANCHOR_DIVISOR
from kvpack.codec.kernels.floats import BF16 as BF16
from kvpack.codec.kernels.floats import ESCAPE as ESCAPE
from kvpack.codec.kernels.floats import FP16 as FP16
from kvpack.codec.kernels.floats import FP32 as FP32
from kvpack.codec.kernels.floats import GROUP_K_BLOCK as GROUP_K_BLOCK
from kvpack.codec.kernels.floats import GROUP_K_CHANNEL as GROUP_K_CHANNEL
from kvpack.codec.kernels.floats import GROUP_V as GROUP_V
from kvpack.codec.kernels.floats import STEP_EXP_BIAS as STEP_EXP_BIAS
from kvpack.codec.kernels.floats import STEP_MANTISSAS as STEP_MANTISSAS
from kvpack.codec.kernels.histogram import block_histograms as block_histograms
from kvpack.codec.kernels.huffman_decode import MULTI_BITS as MULTI_BITS
from kvpack.codec.kernels.huffman_decode import huffman_decode as huffman_decode
from kvpack.codec.kernels.huffman_decode import multi_table as multi_table
from kvpack.codec.kernels.huffman_encode import huffman_encode as huffman_encode
from kvpack.codec.kernels.jit import _kernel as _kernel
from kvpack.codec.kernels.quantize import quantize_blocks as quantize_blocks


def __getattr__(name: str) -> Any:
    """`kernels.warm_up` still works (old import path); it lives in kvpack.codec.warmup, which
    imports the wrappers, so importing it here eagerly would bring back the import cycle."""
    if name == "warm_up":
        from kvpack.codec.warmup import warm_up

        return warm_up
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
