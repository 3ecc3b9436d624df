"""Turn `kvpack bench` results into aligned text rows and the target checks.

Rows are (figure, median, spread, versus-reference); rates are GB/s (1e9 bytes/s) of input
bytes, times are milliseconds, spreads are min–max over the repeats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Row = tuple[str, str, str, str]


def _rate(r: dict[str, float]) -> tuple[str, str]:
    return f"{r['median']:.3f} GB/s", f"{r['min']:.3f}–{r['max']:.3f}"


def _ms(t: dict[str, float]) -> tuple[str, str]:
    return f"{t['median_s'] * 1e3:.1f} ms", f"{t['min_s'] * 1e3:.1f}–{t['max_s'] * 1e3:.1f}"


def copy_gbps(results: dict[str, Any]) -> float | None:
    """Median memory-copy GB/s of this run (the copy section, else lossy's own copy)."""
    if "copy" in results:
        return float(results["copy"]["gbps"]["median"])
    if "lossy" in results:
        return float(results["lossy"]["copy_gbps"]["median"])
    return None


def _vs_copy(rate: dict[str, float], copy: float | None) -> str:
    return f"{rate['median'] / copy:.4f}x copy" if copy else ""


def _copy_rows(res: dict[str, Any], copy: float | None) -> list[Row]:
    return [("memory copy (clone K+V)", *_rate(res["gbps"]), "1x (reference)")]


def _eviction_rows(res: dict[str, Any], copy: float | None) -> list[Row]:
    rows: list[Row] = [("eviction: clone K+V (its reference)", *_ms(res["copy"]), "1x")]
    for name, t in res["policies"].items():
        figure = f"eviction {name}: stats+select+gather (kept {t['kept_fraction']:.2f})"
        rows.append((figure, *_ms(t), f"{t['vs_copy']:.2f}x copy time"))
    return rows


def _lossy_rows(res: dict[str, Any], copy: float | None) -> list[Row]:
    rows: list[Row] = []
    for mode in ("lossy", "fixed", "lossless"):
        e = res[mode]
        for way in ("encode", "decode"):
            rate = e[f"{way}_gbps"]
            rows.append((f"{mode}: {way}", *_rate(rate), _vs_copy(rate, copy)))
        size = f"ratio {e['ratio_vs_fp16']:.2f}x vs fp16"
        errors = f"rel err K {e['key_rel_error']:.3f} V {e['value_rel_error']:.3f}"
        rows.append((f"{mode}: size", size, "", errors))
        if "bits_per_symbol" in e:
            bits = f"{e['bits_per_symbol']:.3f} bits/sym"
            rows.append(
                (
                    f"{mode}: bits/symbol vs Shannon",
                    bits,
                    f"H = {e['entropy_bits_per_symbol']:.3f}",
                    f"{e['coded_over_entropy']:.4f}x entropy",
                )
            )
    rows.append(("lossy vs fixed-width at the same bound", f"{res['lossy_vs_fixed']:.3f}x", "", ""))
    return rows


def _codec_rows(res: dict[str, Any], copy: float | None) -> list[Row]:
    rows: list[Row] = []
    for shape, label in (("llama", "Llama shape"), ("head_dim_32", "head_dim-32 cache")):
        r = res[shape]
        for way in ("encode", "decode", "decode_into"):
            name = "decode into reused tensors" if way == "decode_into" else way
            one, two = r["1t"][f"{way}_gbps"], r["2t"][f"{way}_gbps"]
            rows.append((f"{label}: {name}, 1 thread", *_rate(one), _vs_copy(one, copy)))
            rows.append(
                (
                    f"{label}: {name}, 2 threads",
                    *_rate(two),
                    f"{r[f'2t_over_1t_{way}']:.2f}x 1 thread",
                )
            )
    for shape, label in (("llama", "Llama shape"), ("head_dim_32", "head_dim-32 cache")):
        for kind, stage in res.get("stages", {}).get(shape, {}).items():
            ns = stage["ns_per_value_or_symbol"]
            mix = "/".join(f"{c} {n}" for c, n in sorted(stage["auto_coders"].items()))
            rows.append(
                (
                    f"{label}: {kind.upper()} ns/value, thread CPU (quantise, dequantise)",
                    f"{ns['quantise']:.2f}, {ns['dequantise']:.2f}",
                    "",
                    "",
                )
            )
            rows.append(
                (
                    f"{label}: {kind.upper()} ns/symbol, thread CPU (entropy encode, decode)",
                    f"{ns['entropy_encode_auto']:.2f}, {ns['entropy_decode_auto']:.2f}",
                    f"{stage['bits_per_symbol']:.2f} bits/symbol",
                    f"auto chose {mix}",
                )
            )
    st = res["restore"]
    cache = st["cache"]
    what = f"restore Llama-3-8B {cache['tokens']}-token cache ({cache['bytes'] / 2**20:.0f} MiB)"
    prefill = f"prefill {st['prefill_s']:.3f} s at {st['prefill_tokens_per_s']:.0f} tok/s"
    rows.append((f"{what}: decode, 1 core", f"{st['decode_s_per_core']:.3f} s", prefill, ""))
    rows.append(
        (f"{what}: decode, {st['cores']} cores", f"{st['decode_s_all_cores']:.3f} s", prefill, "")
    )
    return rows


def _zstd_rows(res: dict[str, Any], copy: float | None) -> list[Row]:
    rows: list[Row] = []
    for dtype, entry in res.items():
        for name, e in entry.items():
            if name == "raw_bytes":
                continue
            label = f"{dtype} {name}"
            for way in ("encode", "decode"):
                rate = e[f"{way}_gbps"]
                rows.append((f"{label}: {way}", *_rate(rate), _vs_copy(rate, copy)))
            rows.append((f"{label}: size", f"ratio {e['ratio']:.3f}x", "", ""))
    return rows


def _concurrency_rows(res: dict[str, Any], copy: float | None) -> list[Row]:
    rows: list[Row] = []
    for n in ("1", "4", "16"):
        e = res[n]
        rows.append(
            (
                f"{n} clients: throughput ({e['calls']} calls)",
                f"{e['gbps']:.4f} GB/s",
                f"{e['requests_per_s']:.2f} req/s",
                "",
            )
        )
        rows.append(
            (
                f"{n} clients: latency p50 / p99",
                f"{e['p50_s'] * 1e3:.0f} ms",
                f"p99 {e['p99_s'] * 1e3:.0f} ms",
                f"p99 = {e['p99_over_p50']:.2f}x p50",
            )
        )
    return rows


def _service_rows(res: dict[str, Any], copy: float | None) -> list[Row]:
    rows: list[Row] = []
    for name, label in (("compress", "Compress"), ("compress_store", "Compress + store")):
        e = res[name]
        rows.append(
            (
                f"{label} ({e['upload_mib']:.0f} MiB, best of repeats)",
                f"{e['compress_mb_s'] / 1e3:.4f} GB/s",
                f"bare gRPC {e['bare_stream_mb_s'] / 1e3:.3f} GB/s",
                f"{e['ratio']:.3f}x bare gRPC",
            )
        )
    f = res["fetch"]
    bare = res["compress"]["bare_stream_mb_s"] / 1e3
    rows.append(
        (
            f"Fetch ({f['stored_bytes'] / 2**20:.1f} MiB stored)",
            *_rate(f["fetch_stored_gbps"]),
            f"{f['fetch_stored_gbps']['median'] / bare:.3f}x bare gRPC upload",
        )
    )
    rows.append(
        (
            f"Fetch + client decode ({f['kept_bytes'] / 2**20:.1f} MiB K+V out)",
            *_rate(f["fetch_decode_gbps"]),
            _vs_copy(f["fetch_decode_gbps"], copy),
        )
    )
    return rows


def _generic_rows(res: dict[str, Any], prefix: str = "") -> list[Row]:
    """Flattened numeric leaves, for sections whose layout this module does not know."""
    rows: list[Row] = []
    for key, value in res.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _generic_rows(value, name + ".")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append((name, f"{value:.6g}", "", ""))
    return rows


def _lmcache_rows(res: dict[str, Any], copy: float | None) -> list[Row]:
    from kvpack.bench import lmcache

    return lmcache.rows(res)


ROWS: dict[str, Callable[[dict[str, Any], float | None], list[Row]]] = {
    "lmcache": _lmcache_rows,
    "copy": _copy_rows,
    "eviction": _eviction_rows,
    "lossy": _lossy_rows,
    "codec": _codec_rows,
    "zstd": _zstd_rows,
    "service": _service_rows,
    "concurrency": _concurrency_rows,
}


def rows(section: str, res: dict[str, Any], copy: float | None) -> list[Row]:
    """Table rows of one section's results."""
    fn = ROWS.get(section)
    return fn(res, copy) if fn is not None else _generic_rows(res)


def table(sections: dict[str, list[Row]]) -> str:
    """Aligned plain text: a header per section, then its rows."""
    all_rows = [r for rs in sections.values() for r in rs]
    header: Row = ("figure", "median", "spread (min–max)", "vs reference")
    widths = [max(len(r[i]) for r in [header, *all_rows]) for i in range(4)]

    def fmt(r: Row) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    out = [fmt(header)]
    for name, rs in sections.items():
        out.append(f"-- {name}")
        out += [fmt(r) for r in rs]
    return "\n".join(out)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #10's targets that this run measured: {"target", "value", "limit", "met"}.
    Per-core targets are compared with single-thread figures."""
    out: list[dict[str, Any]] = []

    def check(name: str, value: float, limit: float, at_least: bool) -> None:
        met = value >= limit if at_least else value <= limit
        out.append({"target": name, "value": value, "limit": limit, "met": met})

    if "lossy" in results:
        lossy = results["lossy"]["lossy"]
        check("lossy encode >= 1 GB/s per core", lossy["encode_gbps"]["median"], 1.0, True)
        check("lossy decode >= 2 GB/s per core", lossy["decode_gbps"]["median"], 2.0, True)
        if "coded_over_entropy" in lossy:
            check("lossy bits <= 1.02x Shannon", lossy["coded_over_entropy"], 1.02, False)
    if "codec" in results:
        for shape, scale in (("llama", 1.0), ("head_dim_32", 0.5)):
            r = results["codec"][shape]
            where = "Llama shape" if shape == "llama" else "head_dim-32"
            enc = r["1t"]["encode_gbps"]["median"]
            dec = r["1t"]["decode_gbps"]["median"]
            check(f"{where}: encode >= {scale:g} GB/s per core", enc, scale, True)
            check(f"{where}: decode >= {2 * scale:g} GB/s per core", dec, 2 * scale, True)
            for way in ("encode", "decode"):
                check(
                    f"{where}: 2 threads {way} >= 1.8x 1 thread", r[f"2t_over_1t_{way}"], 1.8, True
                )
    if "eviction" in results:
        for name, t in results["eviction"]["policies"].items():
            check(f"eviction {name} <= 2x copy", t["vs_copy"], 2.0, False)
    if "service" in results:
        for name in ("compress", "compress_store"):
            check(f"service {name} >= 0.7x bare gRPC", results["service"][name]["ratio"], 0.7, True)
    if "concurrency" in results and "16" in results["concurrency"]:
        ratio = results["concurrency"]["16"]["p99_over_p50"]
        check("p99 <= 2x p50 at 16 clients", ratio, 2.0, False)
    return out


def target_lines(checks: list[dict[str, Any]]) -> str:
    """One line per target: met/MISSED, value, limit and the factor between them."""
    lines = []
    for c in checks:
        factor = c["value"] / c["limit"] if c["limit"] else float("nan")
        verdict = "met   " if c["met"] else "MISSED"
        value = f"{c['value']:.4g} (limit {c['limit']}, {factor:.3g}x the limit)"
        lines.append(f"{verdict} {c['target']}: {value}")
    return "\n".join(lines)
