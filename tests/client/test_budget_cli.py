"""`kvpack compress --target-ratio/--target-bytes` against a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.client.client_support import ServerThread, make_cache
from tests.client.test_cli import kvpack


def _source(tmp_path: Path) -> Path:
    scores, keys, values = make_cache(seed=31)
    source = tmp_path / "cache.safetensors"
    tensors = {"scores": scores, **{f"keys.{i}": k for i, k in enumerate(keys)}}
    save_file(tensors | {f"values.{i}": v for i, v in enumerate(values)}, str(source))
    return source


def test_compress_to_a_budget(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _source(tmp_path)
    assert kvpack(
        "compress", str(source), "--target", server.address, "--target-ratio", "6",
        "--max-error-bound", "0.2", "--key", "cli/budget",
    ) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    budget = out["budget"]
    assert out["stored_bytes"] == budget["stored_bytes"] <= budget["budget_bytes"]
    assert budget["budget_bytes"] == int(budget["fp16_bytes"] / 6)
    assert max(budget["k_error_bound"], budget["v_error_bound"]) <= 0.2
    assert kvpack(
        "compress", str(source), "--target", server.address, "--target-bytes",
        str(budget["budget_bytes"]), "--no-store",
    ) == 1  # fmt: skip
    assert "InvalidArgument" in capsys.readouterr().err


def test_a_budget_too_small_names_the_smallest_size(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _source(tmp_path)
    code = kvpack("compress", str(source), "--target", server.address, "--target-bytes", "64")
    assert code == 1
    err = capsys.readouterr().err
    assert "InvalidArgument" in err and "smallest container" in err and "smaller than fp16" in err
