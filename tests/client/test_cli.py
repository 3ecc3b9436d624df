"""`kvpack compress` / `kvpack fetch` against a real server, through safetensors files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvpack import codec
from kvpack.client import cli
from tests.client.client_support import ServerThread, make_cache


def kvpack(*argv: str) -> int:
    """Parses and runs like kvpack/cli.py does with compress/fetch registered."""
    parser = argparse.ArgumentParser(prog="kvpack")
    sub = parser.add_subparsers(dest="command")
    for name in ("compress", "fetch"):
        cli.configure(sub.add_parser(name))
    return cli.run(parser.parse_args(argv))


def test_compress_then_fetch(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scores, keys, values = make_cache(seed=20)
    source = tmp_path / "cache.safetensors"
    save_file(
        {"scores": scores, **{f"keys.{i}": k for i, k in enumerate(keys)}}
        | {f"values.{i}": v for i, v in enumerate(values)},
        str(source),
    )
    composite = tmp_path / "composite.safetensors"
    assert kvpack(
        "compress", str(source), "--target", server.address, "--ratio", "0.5", "--key", "cli/a",
        "--quant", "mode=lossless", "--output", str(composite),
    ) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["key"] == "cli/a" and summary["token_ratio"] == pytest.approx(0.5, abs=0.02)
    written = load_file(str(composite))
    expected = codec.select(scores, 0.5, num_kv_heads=2)
    for layer in range(3):
        assert torch.equal(written[f"indices.{layer}"], expected[layer])

    fetched = tmp_path / "fetched.safetensors"
    assert kvpack("fetch", "cli/a", "--target", server.address, "--output", str(fetched)) == 0
    back = load_file(str(fetched))
    for layer in range(3):  # lossless mode: bit-exact
        assert torch.equal(back[f"keys.{layer}"], written[f"keys.{layer}"])
        assert torch.equal(back[f"values.{layer}"], written[f"values.{layer}"])

    part = tmp_path / "part.safetensors"
    assert kvpack(
        "fetch", "cli/a", "--target", server.address, "--output", str(part), "--layers", "1:3"
    ) == 0  # fmt: skip
    assert sorted(load_file(str(part))) == sorted(
        f"{kind}.{layer}" for kind in ("keys", "values", "indices") for layer in (1, 2)
    )


def test_errors_print_server_message(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.safetensors"
    assert kvpack("fetch", "cli/missing", "--target", server.address, "--output", str(out)) == 1
    assert "NotFound: no entry 'cli/missing'" in capsys.readouterr().err


def test_quant_options_take_field_or_short_names(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quant names map onto QuantSettings in one place (the same short names as kvpack eval's
    --quant); a bad name or value ends the command with a message naming it."""
    _, keys, values = make_cache(seed=21)
    source = tmp_path / "cache.safetensors"
    save_file({f"{kind}.{i}": t for kind, ts in (("keys", keys), ("values", values))
               for i, t in enumerate(ts)}, str(source))  # fmt: skip
    common = ("compress", str(source), "--target", server.address, "--policy", "none")
    assert kvpack(*common, "--key", "cli/q", "--quant", "kwin=0", "--quant", "eb=0.2",
                  "--quant", "block_tokens=16") == 0  # fmt: skip
    capsys.readouterr()
    settings = codec.read_header(_fetch_raw(server, tmp_path, "cli/q")).settings
    assert (settings.k_window, settings.block_tokens) == (0, 16)
    assert settings.k_error_bound == settings.v_error_bound == 0.2
    for bad, word in (("kwindow=0", "kwindow"), ("block=x", "block_tokens")):
        with pytest.raises(SystemExit, match=word):
            kvpack(*common, "--quant", bad)


def _fetch_raw(server: ServerThread, tmp_path: Path, key: str) -> bytes:
    raw = tmp_path / f"{key.replace('/', '_')}.kvpk"
    assert kvpack("fetch", key, "--target", server.address, "--output", str(raw), "--raw") == 0
    return raw.read_bytes()
