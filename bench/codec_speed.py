"""Codec speed per core and on two threads, on the Llama shape and on reference-model-like
head_dim-32 caches, and what restoring a whole Llama-3-8B cache costs next to recomputing it.

    kvpack bench --only codec [--layers 2 --seq 4096 --repeats 3 --prefill-tokens-per-s 10000]

Per core: encode_layer + assemble and decode on the calling thread (kernels single-threaded,
torch on 1 thread). Two threads: the same layers encoded on a 2-thread pool (as the server's
codec pool does) and decode(threads=2) (as a client can); the ratio to one thread is the
figure (>= 1.8x is the target). Decode is also timed into reused output tensors (decode(into=)),
which is what a restore loop that keeps its buffers pays: no allocation, no first-touch faults.

The head_dim-32 cache has the reference model's layout (eval/model.py: 4 layers, 2 KV heads,
head_dim 32, batch 1) at --seq tokens, synthetic values from the same generator.

Stages (`stages`): thread CPU time per call of each step of one stream's encode and decode on
the calling thread, best of --repeats, summed over the cache's layers, in ns per value (ns per
symbol for the entropy steps): quantise, entropy encode ("auto", and each coder forced),
entropy decode, dequantise. Thread CPU time counts only this thread's running time, so the
figures hold on a loaded machine (other processes only slow them through shared caches/cores),
and they say which step to work on next.

Restore vs recompute: the seconds to decode Llama-3-8B's 4096-token cache (32 layers, 8 KV
heads, head_dim 128, fp16: 512 MiB) at the decode rates measured here, per core and on all
cores of this machine, next to the prefill time that cache represents at
--prefill-tokens-per-s (default 10,000 tokens/s: issue #21's figure for an H100 prefilling
Llama-3-8B; pass your own measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kvpack.bench.lossy import synthetic_kv
from kvpack.bench.timing import gbps, measure
from kvpack.codec import (
    QuantSettings,
    assemble,
    decode,
    dtype_from_name,
    encode_layer,
    entropy,
    quant,
)
from kvpack.codec.stream import StreamSpec

LLAMA_CACHE = {"layers": 32, "kv_heads": 8, "head_dim": 128, "tokens": 4096}
REFERENCE_LAYOUT = {"layers": 4, "kv_heads": 2, "head_dim": 32}
DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefill-tokens-per-s",
        type=float,
        default=DEFAULT_PREFILL_TOKENS_PER_S,
        help="prefill rate the restore line compares with (default: issue #21's H100 figure)",
    )


def _encoder(
    ks: list[torch.Tensor], vs: list[torch.Tensor], s: QuantSettings, threads: int
) -> Callable[[], bytes]:
    def run() -> bytes:
        pairs = list(zip(ks, vs, strict=True))
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                layers = list(pool.map(lambda kv: encode_layer(kv[0], kv[1], None, s), pairs))
        else:
            layers = [encode_layer(k, v, None, s) for k, v in pairs]
        return assemble(layers, s, dtype=ks[0].dtype)

    return run


def _shape_figures(ks: list[torch.Tensor], vs: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Encode/decode GB/s of one cache on 1 and 2 threads, and decode into reused tensors."""
    s = QuantSettings()
    raw = sum(t.numel() * t.element_size() for t in ks + vs)
    out: dict[str, Any] = {"input_bytes": raw}
    blob = _encoder(ks, vs, s, 1)()
    out["ratio_vs_input"] = raw / len(blob)
    into = [(torch.empty_like(k), torch.empty_like(v)) for k, v in zip(ks, vs, strict=True)]
    for threads in (1, 2):
        enc = measure(_encoder(ks, vs, s, threads), repeats)
        dec = measure(functools.partial(decode, blob, threads=threads), repeats)
        dec_into = measure(functools.partial(decode, blob, threads=threads, into=into), repeats)
        out[f"{threads}t"] = {
            "encode_gbps": gbps(raw, enc),
            "decode_gbps": gbps(raw, dec),
            "decode_into_gbps": gbps(raw, dec_into),
        }
    for way in ("encode_gbps", "decode_gbps", "decode_into_gbps"):
        out[f"2t_over_1t_{way.removesuffix('_gbps')}"] = (
            out["2t"][way]["median"] / out["1t"][way]["median"]
        )
    return out


def _cpu_time(fn: Callable[[], object], repeats: int) -> float:
    """Best thread CPU seconds of `fn` over `repeats` calls after one untimed call."""
    fn()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def _stage_figures(ks: list[torch.Tensor], vs: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Per stream kind: ns per value of quantise / dequantise and ns per symbol of the entropy
    steps (thread CPU time, best of `repeats`, summed over layers), bits per symbol and the
    coder mix "auto" chose."""
    out: dict[str, Any] = {}
    s = QuantSettings()
    for kind, xs in (("k", ks), ("v", vs)):
        spec = StreamSpec.of(kind, s)
        t = spec.block_tokens
        secs: dict[str, float] = {}
        values = symbols = coded_bytes = 0
        coders: dict[str, int] = {}
        for x in xs:
            nb = spec.blocks(x.shape[2])
            values += nb * t * x.shape[0] * x.shape[1] * x.shape[3]
            qz = quant.quantize_blocks(x, spec.grouping, t, spec.error_bound, nb)
            symbols += int(qz.symbols.size)
            steps: dict[str, Callable[[], object]] = {
                "quantise": functools.partial(
                    quant.quantize_blocks, x, spec.grouping, t, spec.error_bound, nb
                )
            }
            coded = entropy.encode_symbol_blocks(qz.symbols, qz.counts, spec, None, qz.hist)
            coded_bytes += sum(len(p) for p in coded.payloads)
            for c in coded.coders:
                coders[c] = coders.get(c, 0) + 1
            for coder in ("auto", "zstd", "huffman"):
                forced = dataclasses.replace(spec, entropy=coder)
                steps[f"entropy_encode_{coder}"] = functools.partial(
                    entropy.encode_symbol_blocks, qz.symbols, qz.counts, forced, None, qz.hist
                )
            steps["entropy_decode_auto"] = functools.partial(
                entropy.decode_symbol_blocks,
                coded.coders,
                coded.payloads,
                qz.counts,
                spec,
                coded.lengths,
            )
            target = torch.empty_like(x)
            steps["dequantise"] = functools.partial(
                quant.dequantize_blocks,
                qz.symbols,
                qz.mn,
                qz.step,
                spec.grouping,
                spec.levels,
                target,
                t,
            )
            for name, fn in steps.items():
                secs[name] = secs.get(name, 0.0) + _cpu_time(fn, repeats)
        per = {
            name: sec * 1e9 / (values if name in ("quantise", "dequantise") else max(symbols, 1))
            for name, sec in secs.items()
        }
        out[kind] = {
            "ns_per_value_or_symbol": per,
            "values": values,
            "symbols": symbols,
            "bits_per_symbol": 8 * coded_bytes / max(symbols, 1),
            "auto_coders": coders,
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Per-core and 2-thread codec figures, and the restore-vs-recompute line."""
    torch.set_num_threads(1)
    dtype = dtype_from_name(args.dtype)
    llama = synthetic_kv(args.layers, args.kv_heads, args.head_dim, args.seq, dtype)
    ref = synthetic_kv(
        REFERENCE_LAYOUT["layers"],
        REFERENCE_LAYOUT["kv_heads"],
        REFERENCE_LAYOUT["head_dim"],
        args.seq,
        dtype,
        seed=1,
    )
    result: dict[str, Any] = {
        "llama": _shape_figures(*llama, args.repeats),
        "head_dim_32": _shape_figures(*ref, args.repeats),
        "stages": {
            "llama": _stage_figures(*llama, args.repeats),
            "head_dim_32": _stage_figures(*ref, args.repeats),
        },
    }
    cache_bytes = 2 * 2 * math.prod(LLAMA_CACHE.values())  # K and V, fp16
    tokens_per_s = float(getattr(args, "prefill_tokens_per_s", DEFAULT_PREFILL_TOKENS_PER_S))
    per_core = result["llama"]["1t"]["decode_into_gbps"]["median"]
    two = result["llama"]["2t"]["decode_into_gbps"]["median"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    # All cores: the 2-thread rate scaled by cores / 2 (layers decode independently).
    all_cores = two * cores / 2 if cores >= 2 else per_core
    result["restore"] = {
        "cache": dict(LLAMA_CACHE, bytes=cache_bytes, dtype="fp16"),
        "decode_s_per_core": cache_bytes / (per_core * 1e9),
        "decode_s_all_cores": cache_bytes / (all_cores * 1e9),
        "cores": cores,
        "prefill_tokens_per_s": tokens_per_s,
        "prefill_s": LLAMA_CACHE["tokens"] / tokens_per_s,
    }
    return result
