"""Lossy-encoding benchmark on synthetic KV: size vs fp16 and per-core throughput.

    .venv/bin/python -m kvpack.bench.lossy [--layers 4 --kv-heads 8 --head-dim 128 --seq 2048
        --dtype fp16 --repeats 3 --profile]
    .venv/bin/python -m kvpack.bench.lossy --sizes [--data llama|reference [--caches FILE]]

--sizes prints container bytes of lossy and fixed-width encoding at the same error bounds
(K0.05/V0.1 and K0.1/V0.2, blocks of 32 and 64 tokens, windows 0) instead of timing: on the
synthetic Llama-shaped cache below, or (--data reference) on the reference model's prefill
caches of the two task families it solves (eval/: 2040-token contexts, fp32, as `kvpack eval`
encodes them).

K: Gaussian with a per-channel scale and offset and a few outlier channels (post-RoPE keys look
like this); V: smoother, a random walk along tokens plus noise. Throughput is GB/s of input
bytes in the given dtype on one thread, next to a plain memory copy of the same bytes timed in
the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvpack.codec import QuantSettings, assemble, decode, dtype_from_name, encode, encode_layer


def synthetic_kv(
    layers: int, heads: int, head_dim: int, seq: int, dtype: torch.dtype, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K, V [1, heads, seq, head_dim]."""
    gen = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    for _ in range(layers):
        scale = torch.rand(1, heads, 1, head_dim, generator=gen) * 1.5 + 0.25
        outliers = torch.randperm(head_dim, generator=gen)[: max(1, head_dim // 32)]
        scale[..., outliers] *= 12
        offset = torch.randn(1, heads, 1, head_dim, generator=gen)
        ks.append((torch.randn(1, heads, seq, head_dim, generator=gen) * scale + offset).to(dtype))
        noise = torch.randn(1, heads, seq, head_dim, generator=gen)
        # Smoother than K: a random walk along tokens (scaled to unit variance) plus noise.
        walk = torch.cumsum(noise, dim=2) / torch.arange(1, seq + 1).sqrt().view(1, 1, -1, 1)
        v = 0.3 * noise + 0.7 * walk
        vs.append(v.to(dtype))
    return ks, vs


def _timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    fn()  # warm-up (allocator, lazy imports, CUDA kernels); not timed
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def _rate(nbytes: int, times: list[float]) -> dict[str, float]:
    rates = [nbytes / t / 1e9 for t in times]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def run(args: argparse.Namespace) -> dict[str, object]:
    """Run the benchmark; returns a JSON-able dict (ratios, bits/symbol, GB/s)."""
    torch.set_num_threads(1)
    dtype = dtype_from_name(args.dtype)
    ks, vs = synthetic_kv(args.layers, args.kv_heads, args.head_dim, args.seq, dtype)
    # `kvpack bench --device cuda` encodes from (and decodes to) GPU tensors.
    device = torch.device(getattr(args, "device", "cpu"))
    ks, vs = [k.to(device) for k in ks], [v.to(device) for v in vs]
    raw = sum(k.numel() + v.numel() for k, v in zip(ks, vs, strict=True)) * dtype.itemsize
    fp16_bytes = raw // dtype.itemsize * 2
    copy_times, _ = _timed(lambda: [t.clone() for t in ks + vs], args.repeats)
    result: dict[str, object] = {
        "shape": [args.layers, args.kv_heads, args.seq, args.head_dim],
        "dtype": args.dtype,
        "input_bytes": raw,
        "copy_gbps": _rate(raw, copy_times),
    }
    for mode in ("lossy", "fixed", "lossless"):
        s = QuantSettings(mode=mode)

        def enc(s: QuantSettings = s) -> bytes:
            layers = [encode_layer(k, v, None, s) for k, v in zip(ks, vs, strict=True)]
            return assemble(layers, s, dtype=dtype)

        enc_times, blob = _timed(enc, args.repeats)
        assert isinstance(blob, bytes)

        def dec(blob: bytes = blob) -> object:
            return decode(blob, device=device)

        dec_times, _ = _timed(dec, args.repeats)
        layers = [encode_layer(k, v, None, s) for k, v in zip(ks, vs, strict=True)]
        stats = [lay.stats for lay in layers if lay.stats is not None]
        symbols = sum(st.symbols for st in stats)
        entry: dict[str, object] = {
            "bytes": len(blob),
            "ratio_vs_fp16": fp16_bytes / len(blob),
            "encode_gbps": _rate(raw, enc_times),
            "decode_gbps": _rate(raw, dec_times),
            "key_rel_error": max(st.key_rel_error for st in stats),
            "value_rel_error": max(st.value_rel_error for st in stats),
        }
        if symbols:
            coded = sum(st.coded_bits for st in stats)
            ent = sum(st.entropy_bits for st in stats)
            entry.update(
                bits_per_symbol=coded / symbols,
                entropy_bits_per_symbol=ent / symbols,
                coded_over_entropy=coded / ent if ent else float("nan"),
            )
        result[mode] = entry
    lossy, fixed = result["lossy"], result["fixed"]
    assert isinstance(lossy, dict) and isinstance(fixed, dict)
    result["lossy_vs_fixed"] = fixed["bytes"] / lossy["bytes"]
    if args.profile:
        result["profile"] = _profile(ks, vs, dtype)
    return result


def _profile(ks: list[torch.Tensor], vs: list[torch.Tensor], dtype: torch.dtype) -> dict[str, str]:
    s = QuantSettings()
    out = {}
    prof = cProfile.Profile()
    prof.enable()
    layers = [encode_layer(k, v, None, s) for k, v in zip(ks, vs, strict=True)]
    blob = assemble(layers, s, dtype=dtype)
    prof.disable()
    out["encode"] = _top(prof)
    prof = cProfile.Profile()
    prof.enable()
    decode(blob)
    prof.disable()
    out["decode"] = _top(prof)
    return out


def _top(prof: cProfile.Profile) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(8)
    return buf.getvalue()


SIZE_BOUNDS = ((0.05, 0.1), (0.1, 0.2))
SIZE_BLOCKS = (32, 64)


def reference_caches() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """K, V of the reference model's prefill (fp32, [1, 2, 2040, 32] per layer) on one example
    of each task family it solves (kvpack eval's prompts, seed 1234), layers of both concatenated
    as separate layers. Needs the checked-in reference checkpoint (eval/reference/)."""
    from kvpack.client.hf.stats import prefill_with_scores
    from kvpack.eval.model import reference_model
    from kvpack.eval.tasks import make_examples

    model = reference_model().eval()
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    for task in ("single_filler", "single_repeat"):
        prompt = make_examples(task, 2048, 1, 1234)[0].prompt
        with torch.no_grad():
            k, v, _ = prefill_with_scores(model, torch.tensor([prompt[:2040]]), mode="agnostic")
        ks += [t.float().cpu() for t in k]
        vs += [t.float().cpu() for t in v]
    return ks, vs


def sizes(ks: list[torch.Tensor], vs: list[torch.Tensor]) -> list[dict[str, object]]:
    """Container bytes of lossy and fixed encoding of one cache at each SIZE_BOUNDS x
    SIZE_BLOCKS (windows 0), with the ratio fixed/lossy and lossy's ratio vs fp16."""
    fp16 = sum(t.numel() for t in ks + vs) * 2
    rows: list[dict[str, object]] = []
    for kb, vb in SIZE_BOUNDS:
        for block in SIZE_BLOCKS:
            got = {}
            for mode in ("lossy", "fixed"):
                s = QuantSettings(  # windows 0 spelled out: v1's defaults were 128 / 256
                    mode=mode,
                    k_error_bound=kb,
                    v_error_bound=vb,
                    block_tokens=block,
                    k_window=0,
                    v_window=0,
                )
                got[mode] = len(encode(ks, vs, settings=s))
            rows.append(
                {
                    "bounds": f"K{kb}/V{vb}",
                    "block": block,
                    "lossy_bytes": got["lossy"],
                    "fixed_bytes": got["fixed"],
                    "lossy_vs_fixed": got["fixed"] / got["lossy"],
                    "lossy_vs_fp16": fp16 / got["lossy"],
                }
            )
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="cProfile one lossy encode and decode")
    p.add_argument("--sizes", action="store_true", help="lossy vs fixed bytes at equal bounds")
    p.add_argument("--data", default="llama", choices=["llama", "reference"], help="for --sizes")
    p.add_argument(
        "--caches",
        type=Path,
        default=None,
        help="--data reference: load the caches from this file, or save them there if absent "
        "(to measure another checkout's codec on the same caches)",
    )
    return p


def main() -> None:
    args = parser().parse_args()
    if args.sizes:
        torch.set_num_threads(1)
        if args.data == "reference" and args.caches is not None and args.caches.exists():
            ks, vs = torch.load(args.caches, weights_only=True)
        elif args.data == "reference":
            ks, vs = reference_caches()
            if args.caches is not None:
                torch.save((ks, vs), args.caches)
        else:
            dtype = dtype_from_name(args.dtype)
            ks, vs = synthetic_kv(args.layers, args.kv_heads, args.head_dim, args.seq, dtype)
        print(json.dumps({"data": args.data, "sizes": sizes(ks, vs)}, indent=1))
        return
    result = run(args)
    profile = result.pop("profile", None)
    print(json.dumps(result, indent=1))
    if isinstance(profile, dict):
        for name, text in profile.items():
            print(f"--- {name} (cProfile, by own time)\n{text}")


if __name__ == "__main__":
    main()
