"""examples/hf_end_to_end.py against a real server: the reference model answers its retrieval
question from caches compressed, stored, fetched and decoded by kvpack."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from tests.client.client_support import ServerThread

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_end_to_end.py"


@pytest.mark.slow
def test_example_answers_from_fetched_caches(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runpy.run_path(str(EXAMPLE))["run"]
    assert run(server.address, [0.0, 0.5], 1024, 2) == 2
    out = capsys.readouterr().out
    assert out.count("right\n") == 3 and "WRONG" not in out  # two ratios and the total
