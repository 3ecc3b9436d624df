"""Entropy coding of one stream's quantised symbols, block by block, behind a coder registry.

Coders recorded per block in the container (CODERS): "huffman" (canonical Huffman with the
stream's codebook), "zstd" (one zstd frame of the symbols as uint8, or uint16 LE above 256
levels), "fixed" (the baseline's ceil(log2(levels)) bits per symbol). Each coder has an encode,
a structural check and a decode over all of its blocks of a stream at once.

Which coder codes a block (QuantSettings.entropy): "zstd" and "huffman" use that coder for every
block (Huffman falls back to zstd for a block its codebook cannot code); "auto" codes every
block with zstd and uses Huffman instead where the block's exact Huffman size, known from its
symbol histogram without encoding it, is at least HUFFMAN_MARGIN smaller. zstd is the first
choice because on quantised KV it is as small as Huffman (order-0 literals with a per-block
table; within +-0.3 % on synthetic caches) or much smaller where rows repeat (the first layer's
values of repeated tokens: 11 % on the reference model), and its decoder is ~3x faster than
ours. Nothing is trial-encoded twice except the blocks Huffman wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from kvpack.codec import huffman, kernels, lossless
from kvpack.codec.kernels import zstd_native
from kvpack.codec.stream import StreamSpec

# Huffman replaces zstd in "auto" only when at least this much smaller: below it zstd's faster
# decoder is worth more than the bytes.
HUFFMAN_MARGIN = 0.01
# zstd's "fast" strategy, min_match 7: on quantised symbols short matches are mostly noise
# (min_match 5-6 made V blocks 3-10 % larger than Huffman, 7 0.2 %) while rows repeated exactly
# still match. 128 KiB window: a block is at most that here. hash_log 10 (level 1 uses 13-17):
# fewer, older candidates mean fewer chance matches on smooth V streams, which zstd found and
# coded at a cost: V of the synthetic Llama cache compresses 1.5-1.7x faster and 0.5 % smaller,
# K (no matches) a little faster; on the reference model's caches, where rows repeat and zstd
# beats Huffman by up to 4x, sizes stay within 0.2 % (docs/PERFORMANCE.md, issue #21).
ZSTD_PARAMS = zstandard.ZstdCompressionParameters(
    window_log=17,
    chain_log=12,
    hash_log=10,
    search_log=1,
    min_match=7,
    target_length=0,
    strategy=zstandard.STRATEGY_FAST,
    write_content_size=True,
)


def _zstd_compressor() -> zstandard.ZstdCompressor:
    return lossless.per_thread(
        "symbols_zc", lambda: zstandard.ZstdCompressor(compression_params=ZSTD_PARAMS)
    )


def shannon_bits(symbols: np.ndarray, n_levels: int) -> float:
    """Total order-0 Shannon information of `symbols` (ints in [0, n_levels)) in bits."""
    flat = np.ascontiguousarray(symbols).reshape(-1)
    hist = kernels.block_histograms(flat, np.array([flat.size], dtype=np.int64), n_levels)
    return histogram_bits(hist[0])


def histogram_bits(hist: np.ndarray) -> float:
    """Order-0 Shannon information in bits (count * empirical entropy) of a symbol histogram."""
    counts = hist[hist > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def symbol_dtype(n_levels: int) -> type[np.unsignedinteger]:
    """numpy dtype of decoded symbols: uint8 up to 256 levels, else uint16."""
    return np.uint8 if n_levels <= 256 else np.uint16


@dataclass(frozen=True)
class CodedBlocks:
    """Per-block payloads and the coder of each; `lengths` is the Huffman codebook used (None
    when no block is Huffman-coded); `histogram` counts every input symbol (int64 [levels])."""

    payloads: list[bytes]
    coders: list[str]
    lengths: np.ndarray | None
    histogram: np.ndarray


def _split(symbols: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
    return [symbols[bounds[i] : bounds[i + 1]] for i in range(len(counts))]


def _zstd_encode(blocks: Sequence[np.ndarray]) -> list[bytes]:
    """One zstd frame per block (blocks already in the payload's symbol width)."""
    zc = _zstd_compressor()
    return [zc.compress(b.data) for b in blocks]


def encode_symbol_blocks(
    symbols: np.ndarray,
    counts: np.ndarray,
    spec: StreamSpec,
    lengths: np.ndarray | None = None,
    hists: np.ndarray | None = None,
) -> CodedBlocks:
    """Code consecutive blocks of `symbols` (1-D ints in [0, spec.levels), block i holds
    counts[i]) with the coders spec.mode / spec.entropy choose (module docstring).

    `lengths`: an existing codebook to reuse (appends); when None one is built from these
    symbols. `hists`: the blocks' symbol histograms (int64 [len(counts), levels]) when the
    caller already has them, else they are counted here.
    """
    counts = np.asarray(counts, dtype=np.int64)
    symbols = np.ascontiguousarray(symbols).reshape(-1)
    if hists is None:
        hists = kernels.block_histograms(symbols, counts, spec.levels)
    total = hists.sum(axis=0)
    nb = len(counts)
    if spec.mode == "fixed":
        buf, offs = kernels.pack_fixed_blocks(symbols, counts, spec.fixed_bits)
        raw = buf.tobytes()
        packed = [raw[offs[i] : offs[i + 1]] for i in range(nb)]
        return CodedBlocks(packed, ["fixed"] * nb, None, total)
    # Blocks in the zstd payload's width, converted once per stream (not per block).
    blocks = _split(
        symbols.astype("<u2" if spec.symbol_width == 2 else np.uint8, copy=False), counts
    )
    if spec.entropy == "zstd" or not symbols.size:
        return CodedBlocks(_zstd_encode(blocks), ["zstd"] * nb, None, total)
    if lengths is None:
        lengths = huffman.code_lengths(total)
    use_huff = (counts > 0) & (hists[:, lengths == 0].sum(axis=1) == 0)  # codable blocks
    zstd_payloads: list[bytes | None] = [None] * nb
    if spec.entropy == "auto":
        trial = _zstd_encode(blocks)
        zstd_size = np.fromiter(map(len, trial), dtype=np.int64, count=nb)
        zstd_payloads = list(trial)
        use_huff &= huffman.payload_bytes(hists, lengths) <= (1 - HUFFMAN_MARGIN) * zstd_size
    huff_idx = np.flatnonzero(use_huff).tolist()
    huff: list[bytes] = []
    if huff_idx:
        sel = symbols if len(huff_idx) == nb else np.concatenate([blocks[i] for i in huff_idx])
        huff = huffman.encode_blocks(sel, counts[huff_idx], lengths)
    for i, payload in zip(huff_idx, huff, strict=True):
        zstd_payloads[i] = payload
    missing = [i for i in range(nb) if zstd_payloads[i] is None]
    for i, payload in zip(missing, _zstd_encode([blocks[i] for i in missing]), strict=True):
        zstd_payloads[i] = payload
    coders = ["huffman" if h else "zstd" for h in use_huff.tolist()]
    payloads = [p for p in zstd_payloads if p is not None]
    return CodedBlocks(payloads, coders, lengths if huff_idx else None, total)


# ------------------------------------------------------------------------------------ registry


def _check_fixed(
    payload: bytes | memoryview, count: int, spec: StreamSpec, lengths: np.ndarray | None
) -> None:
    need = (count * spec.fixed_bits + 7) // 8
    if len(payload) != need:
        raise ValueError(f"fixed-width payload is {len(payload)} bytes, expected {need}")


def _check_zstd(
    payload: bytes | memoryview, count: int, spec: StreamSpec, lengths: np.ndarray | None
) -> None:
    lossless.check_frame(payload, count * spec.symbol_width)


def _check_huffman(
    payload: bytes | memoryview, count: int, spec: StreamSpec, lengths: np.ndarray | None
) -> None:
    if lengths is None:
        raise ValueError("Huffman block in a stream without a codebook")
    huffman.split_payload(payload, count)


# A decoder writes block j of `which` (indices into the stream's blocks) to
# out[pos[which[j]] : pos[which[j]] + counts[which[j]]].
BlockDecoder = Callable[
    [
        list[int],
        Sequence[bytes | memoryview],
        np.ndarray,
        np.ndarray,
        StreamSpec,
        np.ndarray | None,
        np.ndarray,
    ],
    None,
]


def _decode_fixed(
    which: list[int],
    payloads: Sequence[bytes | memoryview],
    counts: np.ndarray,
    pos: np.ndarray,
    spec: StreamSpec,
    lengths: np.ndarray | None,
    out: np.ndarray,
) -> None:
    parts = [payloads[i] for i in which]
    offsets = np.concatenate(([0], np.cumsum([len(p) for p in parts]))).astype(np.int64)
    data = np.frombuffer(b"".join(parts), dtype=np.uint8)
    bad = kernels.unpack_fixed_blocks(
        data, offsets, counts[which], spec.fixed_bits, out, pos[which]
    )
    if bad >= 0:
        _check_fixed(parts[bad], int(counts[which[bad]]), spec, lengths)


def _decode_zstd(
    which: list[int],
    payloads: Sequence[bytes | memoryview],
    counts: np.ndarray,
    pos: np.ndarray,
    spec: StreamSpec,
    lengths: np.ndarray | None,
    out: np.ndarray,
) -> None:
    if not zstd_native.AVAILABLE:
        _decode_zstd_python(which, payloads, counts, pos, spec, out)
        return
    # One nogil call for all blocks, libzstd writing each straight into `out`.
    parts = [payloads[i] for i in which]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
    nbytes = counts[which] * spec.symbol_width
    bad = zstd_native.zstd_decode_blocks(
        zstd_native.DECOMPRESS_DCTX,
        zstd_native.FRAME_SIZE,
        zstd_native.context(),
        buf,
        offsets,
        nbytes,
        out,
        pos[which],
    )
    if bad >= 0:
        i = which[bad]
        _decode_zstd_python([i], payloads, counts, pos, spec, out)  # its error names the cause
        raise lossless.LosslessError(
            f"zstd payload is not exactly one frame of {nbytes[bad]} bytes"
        )


def _decode_zstd_python(
    which: list[int],
    payloads: Sequence[bytes | memoryview],
    counts: np.ndarray,
    pos: np.ndarray,
    spec: StreamSpec,
    out: np.ndarray,
) -> None:
    """Block by block through python-zstandard (where libzstd cannot be loaded)."""
    zd = lossless.decompressor()
    width = spec.symbol_width
    dtype = "<u2" if width == 2 else np.uint8
    for i in which:
        n = int(counts[i]) * width
        try:
            raw = zd.decompress(payloads[i], max_output_size=n)
        except zstandard.ZstdError as e:
            raise lossless.LosslessError(f"zstd: {e}") from None
        if len(raw) != n:
            raise lossless.LosslessError(f"zstd frame gave {len(raw)} bytes, expected {n}")
        out[pos[i] : pos[i] + counts[i]] = np.frombuffer(raw, dtype=dtype)


def _decode_huffman(
    which: list[int],
    payloads: Sequence[bytes | memoryview],
    counts: np.ndarray,
    pos: np.ndarray,
    spec: StreamSpec,
    lengths: np.ndarray | None,
    out: np.ndarray,
) -> None:
    if lengths is None:
        raise ValueError("Huffman block in a stream without a codebook")
    huffman.decode_blocks([payloads[i] for i in which], counts[which], lengths, out, pos[which])


@dataclass(frozen=True)
class Coder:
    """One symbol coder: `check` tests one block's framing from its size alone (no decoding;
    ValueError subclasses), `decode` decodes its blocks of a stream into the symbol array."""

    name: str
    check: Callable[[bytes | memoryview, int, StreamSpec, np.ndarray | None], None]
    decode: BlockDecoder


CODERS: dict[str, Coder] = {
    c.name: c
    for c in (
        Coder("huffman", _check_huffman, _decode_huffman),
        Coder("zstd", _check_zstd, _decode_zstd),
        Coder("fixed", _check_fixed, _decode_fixed),
    )
}


def coder(name: str) -> Coder:
    """The registered coder `name`; ValueError for an unknown one."""
    try:
        return CODERS[name]
    except KeyError:
        raise ValueError(f"unknown coder {name!r}") from None


def check_symbol_block(
    name: str,
    payload: bytes | memoryview,
    count: int,
    spec: StreamSpec,
    lengths: np.ndarray | None,
) -> None:
    """Structural check of one coded block (sizes only, no decoding); ValueError subclasses."""
    coder(name).check(payload, count, spec, lengths)


def decode_symbol_blocks(
    coders: Sequence[str],
    payloads: Sequence[bytes | memoryview],
    counts: Sequence[int] | np.ndarray,
    spec: StreamSpec,
    lengths: np.ndarray | None,
) -> np.ndarray:
    """Decode blocks into one array (symbol_dtype(spec.levels)): block i's counts[i] symbols
    follow block i-1's. Each coder decodes all of its blocks in one call.

    ValueError subclasses on any framing or coding inconsistency. Symbols are not checked
    against the level count here: the dequantisation kernel does that in its pass over them.
    """
    count_arr = np.asarray(counts, dtype=np.int64)
    if len(count_arr) and int(count_arr.min()) < 0:
        # Native coders take sizes as size_t: a negative count would let them write past `out`.
        raise lossless.LosslessError(f"negative symbol count {int(count_arr.min())} in a block")
    pos = np.concatenate(([0], np.cumsum(count_arr))).astype(np.int64)
    out = np.empty(int(pos[-1]), dtype=symbol_dtype(spec.levels))
    names = sorted(set(coders))  # one or two coders per stream: one pass each
    for name in names:
        which = (
            list(range(len(coders)))
            if len(names) == 1
            else [i for i, c in enumerate(coders) if c == name]
        )
        coder(name).decode(which, payloads, count_arr, pos, spec, lengths, out)
    return out
