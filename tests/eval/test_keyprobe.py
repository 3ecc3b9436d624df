"""The key-matching probe runs end to end on the committed reference model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpack.eval import keyprobe, tasks


def test_probe_monitors_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No training time: the monitor runs before and after, and the weights are saved.
    keyprobe.main(["--minutes", "0", "--out", str(tmp_path / "w")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["step"] for line in lines] == [0, 0]
    # The committed model solves single needles at 128 tokens; multi-key is a fraction.
    assert all(line["sf128"] == 1.0 for line in lines)
    assert all(0.0 <= line["mk128_d2"] <= 1.0 for line in lines)
    assert (tmp_path / "w" / "config.json").is_file()
    assert tasks.KEY_LEN == 2  # the default leaves the generator's format alone
