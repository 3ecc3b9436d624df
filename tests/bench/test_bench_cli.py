"""`kvpack bench` on a tiny shape: runs, prints the machine first, writes JSON with positive
figures. No timed assertions (the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpack.bench.timing import measure, percentile, summarize
from kvpack.cli import main

TINY = ["--layers", "2", "--kv-heads", "2", "--q-heads", "4", "--head-dim", "32", "--seq", "384"]


def _bench(tmp_path: Path, *extra: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    argv = ["bench", *TINY, "--repeats", "1", "--policies", "kvcompose,snapkv"]
    assert main([*argv, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text()), str(out)


def test_bench_copy_lossy_eviction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc, _ = _bench(tmp_path, "--only", "copy,lossy,eviction")
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("machine: ")
    assert "load average" in printed.splitlines()[0]
    assert "targets:" in printed
    assert set(doc["results"]) == {"copy", "lossy", "eviction"}
    assert doc["machine"]["cores"] > 0 and doc["machine"]["versions"]["torch"] != "missing"
    res = doc["results"]
    assert res["copy"]["bytes"] > 0 and res["copy"]["gbps"]["median"] > 0
    for mode in ("lossy", "fixed", "lossless"):
        assert res["lossy"][mode]["encode_gbps"]["median"] > 0
        assert res["lossy"][mode]["decode_gbps"]["median"] > 0
        assert res["lossy"][mode]["ratio_vs_fp16"] > 0
    assert res["lossy"]["lossy"]["coded_over_entropy"] > 0
    for name in ("kvcompose", "snapkv"):
        t = res["eviction"]["policies"][name]
        assert t["median_s"] > 0 and t["vs_copy"] > 0
    assert {c["target"] for c in doc["targets"]} >= {"lossy encode >= 1 GB/s per core"}


def test_bench_zstd(tmp_path: Path) -> None:
    doc, _ = _bench(tmp_path, "--only", "zstd")
    for dtype in ("fp16", "bf16"):
        for method in ("zstd-1 raw", "zstd-3 raw", "zstd-3 byte-shuffled"):
            entry = doc["results"]["zstd"][dtype][method]
            assert entry["ratio"] > 0 and entry["encode_gbps"]["median"] > 0


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--only", "nope"])


def test_timing_helpers() -> None:
    t = summarize([3.0, 1.0, 2.0, 4.0])
    assert (t["median_s"], t["min_s"], t["max_s"]) == (2.5, 1.0, 4.0)
    assert t["q1_s"] <= t["median_s"] <= t["q3_s"]
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert percentile([1.0, 2.0], 100) == 2.0
    calls: list[int] = []
    assert measure(lambda: calls.append(1), 3, warmup=2)["n"] == 3
    assert len(calls) == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_codec_parts_on_cuda(tmp_path: Path) -> None:
    doc, _ = _bench(tmp_path, "--only", "copy,eviction,lossy", "--device", "cuda")
    assert doc["machine"]["device"] == "cuda"
    assert doc["results"]["eviction"]["shape"]["device"].startswith("cuda")
    assert doc["results"]["lossy"]["lossy"]["encode_gbps"]["median"] > 0


def test_bench_codec_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc, _ = _bench(tmp_path, "--only", "codec")
    res = doc["results"]["codec"]
    printed = capsys.readouterr().out
    for shape in ("llama", "head_dim_32"):
        for kind in ("k", "v"):
            stage = res["stages"][shape][kind]
            ns = stage["ns_per_value_or_symbol"]
            assert {"quantise", "entropy_encode_auto", "entropy_decode_auto", "dequantise"} <= set(
                ns
            )
            assert all(v > 0 for v in ns.values()) and stage["bits_per_symbol"] > 0
    assert "Llama shape: K ns/value, thread CPU" in printed
    assert "head_dim-32 cache: V ns/symbol, thread CPU" in printed
    for shape in ("llama", "head_dim_32"):
        for threads in ("1t", "2t"):
            for way in ("encode_gbps", "decode_gbps", "decode_into_gbps"):
                assert res[shape][threads][way]["median"] > 0
        assert res[shape]["2t_over_1t_decode"] > 0 and res[shape]["ratio_vs_input"] > 1
    restore = res["restore"]
    assert restore["cache"]["bytes"] == 512 * 2**20 and restore["prefill_s"] == 4096 / 10_000
    assert restore["decode_s_per_core"] > 0 and restore["decode_s_all_cores"] > 0
    assert any(c["target"].startswith("head_dim-32") for c in doc["targets"])
