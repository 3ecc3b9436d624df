"""Golden containers: checked-in files still decode to the recorded bytes, within the error
bound of inputs regenerated from their seed, with exact windows and indices.

Format v1 files (`golden/*.kvpk`, `manifest.json`) were written by the v1 encoder and can no
longer be produced; format v2 files (`golden/v2_*.kvpk`, `manifest_v2.json`) by the current one.
`.venv/bin/python tests/codec/test_golden.py` rewrites the v2 files; do that only with a new
format version, since the point is that a decoder change which breaks old containers fails here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpack.codec import QuantSettings, decode, encode, tensor_to_bytes, verify
from tests.codec.test_quant import check_bound

HERE = Path(__file__).parent / "golden"
CASES: dict[str, tuple[str, QuantSettings]] = {
    "lossy_fp16_channel": (
        "fp16",
        QuantSettings(block_tokens=16, k_window=8, v_window=16),
    ),
    "lossy_bf16_block_huffman": (
        "bf16",
        QuantSettings(
            k_grouping="block", block_tokens=16, k_window=0, v_window=4, entropy="huffman"
        ),
    ),
    "fixed_fp32": ("fp32", QuantSettings(mode="fixed", block_tokens=16, k_window=8, v_window=8)),
    "lossless_bf16": ("bf16", QuantSettings(mode="lossless", block_tokens=16, k_window=8)),
}
# v2: the same cases (their windows spelled out, the defaults are 0 since v2) and a container
# whose second layer has its own error bounds.
CASES_V2: dict[str, tuple[str, QuantSettings]] = {f"v2_{k}": v for k, v in CASES.items()}
CASES_V2["v2_lossy_fp32_per_layer_bounds"] = (
    "fp32",
    QuantSettings(block_tokens=8, k_window=0, v_window=0, entropy="huffman"),
)
PER_LAYER = {"k_error_bound": 0.2, "v_error_bound": 0.013, "k_grouping": "block"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def inputs(dtype: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Two ragged layers from a fixed numpy seed (numpy's generator is stable across versions)."""
    rng = np.random.default_rng(20240601)
    ks, vs, idx = [], [], []
    for n in (45, 30):
        k = rng.standard_normal((1, 2, n, 8)) * np.array([1, 1, 1, 1, 1, 1, 1, 8.0])
        ks.append(torch.from_numpy(k).to(DTYPES[dtype]))
        vs.append(torch.from_numpy(rng.standard_normal((1, 2, n, 4)) * 0.5).to(DTYPES[dtype]))
        pos = np.sort(rng.choice(100, size=n, replace=False))
        idx.append(torch.from_numpy(np.broadcast_to(pos, (1, 2, n)).copy()))
    return ks, vs, idx


def digest(tensors: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(tensor_to_bytes(t) for t in tensors)).hexdigest()


def layer_settings(name: str, s: QuantSettings) -> list[QuantSettings] | None:
    if not name.endswith("per_layer_bounds"):
        return None
    return [s, dataclasses.replace(s, **PER_LAYER)]


def regenerate() -> None:
    """Rewrite the v2 golden containers and their manifest (only when the format changes)."""
    manifest = {}
    for name, (dtype, s) in CASES_V2.items():
        ks, vs, idx = inputs(dtype)
        blob = encode(
            ks,
            vs,
            indices=idx,
            settings=s,
            meta={"case": name},
            seq_len=100,
            layer_settings=layer_settings(name, s),
        )
        (HERE / f"{name}.kvpk").write_bytes(blob)
        out = decode(blob)
        manifest[name] = {
            "dtype": dtype,
            "settings": s.to_dict(),
            "sha256": digest(out.keys + out.values),
        }
    (HERE / "manifest_v2.json").write_text(json.dumps(manifest, indent=1) + "\n")


def check_case(name: str, manifest_file: str, version: int) -> None:
    manifest = json.loads((HERE / manifest_file).read_text())
    blob = (HERE / f"{name}.kvpk").read_bytes()
    header = verify(blob)
    s = QuantSettings.from_mapping(manifest[name]["settings"])
    assert header.version == version and header.settings == s and header.meta == {"case": name}
    assert header.dtype == manifest[name]["dtype"] and header.seq_len == 100
    own = layer_settings(name, s) or [s, s]
    assert header.layer_settings == own
    out = decode(blob)
    assert digest(out.keys + out.values) == manifest[name]["sha256"]
    ks, vs, idx = inputs(header.dtype)
    for i in range(2):
        got = out.indices[i]
        assert got is not None and torch.equal(got, idx[i])
        if s.mode == "lossless":
            assert torch.equal(out.keys[i], ks[i]) and torch.equal(out.values[i], vs[i])
        else:
            check_bound(ks[i], out.keys[i], "k", own[i], version)
            check_bound(vs[i], out.values[i], "v", own[i], version)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_v1_container_decodes(name: str) -> None:
    check_case(name, "manifest.json", 1)


@pytest.mark.parametrize("name", sorted(CASES_V2))
def test_golden_v2_container_decodes(name: str) -> None:
    check_case(name, "manifest_v2.json", 2)


if __name__ == "__main__":
    regenerate()
