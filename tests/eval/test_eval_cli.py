"""`kvpack eval` end to end on a few short examples: files written, and a real server on loopback
gives the same accuracy and bytes as the in-process codec."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from kvpack.cli import main
from kvpack.eval.cli import parse_quant
from kvpack.eval.runner import EvalConfig, token_map
from kvpack.eval.runner import run_eval as run_points
from kvpack.eval.tasks import VOCAB_SIZE, make_examples
from tests.client.client_support import ServerThread

# Every default policy, ratio, quantisation setting and mode (53 points per example) on one short
# example, ~15 s per run on two CPU cores. Length 130 leaves a context whose per-layer budgets
# are fractional at every default ratio: the in-process and the server run share one engine, so
# they round them alike (they used to differ there).
ARGS = [
    "--tasks", "multikey", "--length", "130", "--samples", "1", "--threads", "2", "--no-progress",
]  # fmt: skip
POLICIES = ("kvpack", "kvcompose", "kvcompose_uniform", "snapkv", "tova", "pyramidkv", "streaming")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The reference model; before its weights are committed, a random-init model of the same
    architecture (the loop and the files are checked either way, accuracies are then 0)."""
    from transformers import LlamaForCausalLM

    from kvpack.eval.model import reference_config, reference_model_path

    if (reference_model_path() / "model.safetensors").exists():
        return "reference"
    torch.manual_seed(0)
    config = reference_config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    path = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    running = ServerThread()
    yield running
    running.stop()


def run_eval(model: str, out: Path, *extra: str) -> dict[str, Any]:
    assert main(["eval", "--model", model, *ARGS, "--out", str(out), *extra]) == 0
    result: dict[str, Any] = json.loads((out / "results.json").read_text())
    return result


@pytest.fixture(scope="module")
def local_run(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local")
    run_eval(model_path, out)
    return out


def test_writes_json_csv_and_plots(local_run: Path) -> None:
    result = json.loads((local_run / "results.json").read_text())
    rows = result["points"]
    modes = {r["mode"] for r in rows}
    assert modes == {"baseline", "evict", "lossy", "fixed", "evict+lossy"}
    assert {r["task"] for r in rows} == {"multikey", "all"}
    # per task: baseline + 7 policies x 4 ratios + 4 lossy + 4 fixed + 4 ratios x 4 evict+lossy
    assert len(rows) == 2 * (1 + 28 + 4 + 4 + 16)
    assert result["backend"] == "in-process" and result["wall_seconds"] > 0
    for r in rows:
        assert r["stored_bytes"] > 0 and r["fp16_bytes"] > r["stored_bytes"] * 0.5
        assert 0.0 <= r["accuracy"] <= 1.0 and r["samples"] == 1
    by = {(r["task"], r["mode"], r["policy"], r["ratio"]): r for r in rows}
    base = by["all", "baseline", "none", 0.0]
    assert {p for (_, mode, p, _) in by if mode == "evict"} == set(POLICIES)
    for policy in POLICIES:
        # Eviction shrinks the container roughly in proportion to the kept tokens.
        assert by["all", "evict", policy, 0.875]["x_ratio"] > 5 * base["x_ratio"]
    # Lossy encoding of the same kept tokens stores fewer bytes than lossless.
    combo = by["all", "evict+lossy", "kvpack", 0.5]
    assert combo["stored_bytes"] < by["all", "evict", "kvpack", 0.5]["stored_bytes"]
    lossy, fixed = by["all", "lossy", "none", 0.0], by["all", "fixed", "none", 0.0]
    assert lossy["accuracy"] == fixed["accuracy"]  # same quantiser, different bit packing

    with (local_run / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and float(csv_rows[0]["x_ratio"]) > 0
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: PNG plots not checked")
    for name in ("accuracy_vs_ratio.png", "accuracy_vs_bytes.png"):
        data = (local_run / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_server_run_matches_in_process(
    local_run: Path, model_path: str, server: ServerThread, tmp_path: Path
) -> None:
    remote = run_eval(model_path, tmp_path, "--server", server.address, "--no-plots")
    local = json.loads((local_run / "results.json").read_text())
    assert remote["backend"] == server.address

    def key(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        fields = ("task", "mode", "policy", "ratio", "eb", "accuracy", "stored_bytes")
        return [tuple(r[f] for f in fields) for r in rows]

    assert key(remote["points"]) == key(local["points"])


def test_parse_quant() -> None:
    q = parse_quant("eb=K:0.05,V:0.1,kwin=0,vwin=8,block=32")
    assert q.settings == {
        "k_error_bound": 0.05,
        "v_error_bound": 0.1,
        "k_window": 0,
        "v_window": 8,
        "block_tokens": 32,
    }
    assert q.label == "K0.05/V0.1,kwin=0,vwin=8,block=32"
    assert parse_quant("eb=0.2").settings == {"k_error_bound": 0.2, "v_error_bound": 0.2}
    for bad in ("eb=K:2", "foo=1", "K0.1"):
        with pytest.raises(Exception, match="--quant"):
            parse_quant(bad)


def test_token_map_for_foreign_vocabularies() -> None:
    assert token_map(VOCAB_SIZE) is None
    mapping = token_map(32000, [1, 2, 0])
    assert mapping is not None
    assert len(set(mapping.tolist())) == VOCAB_SIZE
    assert not {0, 1, 2} & set(mapping.tolist()) and int(mapping.max()) < 32000
    assert np.array_equal(mapping, token_map(32000, [1, 2, 0]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smaller"):
        token_map(300)


def test_uncompressed_baseline_answers_like_the_plain_model() -> None:
    """Split prompt, fp16 container, question as a multi-token forward at positions n.. : the
    baseline point generates what plain greedy decoding of the whole prompt generates."""
    from kvpack.client import LocalKVPack
    from kvpack.eval.accuracy import greedy_generate
    from kvpack.eval.model import reference_model, reference_model_path

    if not (reference_model_path() / "model.safetensors").exists():
        pytest.skip("reference weights not in eval/reference yet (a random model's argmax flips)")
    torch.set_num_threads(2)
    model = reference_model()
    examples = make_examples("multikey", 256, 4, seed=7) + make_examples("cwe", 256, 4, seed=7)
    # The plain model's own greedy answers, right or wrong, become the expected answers.
    own = [
        dataclasses.replace(
            ex, answer=greedy_generate(model, torch.tensor([ex.prompt]), len(ex.answer))[0].tolist()
        )
        for ex in examples
    ]
    config = EvalConfig(
        tasks=["multikey", "cwe"], length=256, samples=4, policies=["kvcompose"], ratios=[0.5],
        quants=[], modes=[], combo_policies=[],
    )  # fmt: skip
    results = run_points(model, LocalKVPack(), config, {"own": own})
    assert [r.spec.mode for r in results] == ["baseline"] * len(own)
    assert all(r.correct for r in results)


def test_low_baseline_warns_and_evaluates_no_target(local_run: Path) -> None:
    from kvpack.eval import report

    result = json.loads((local_run / "results.json").read_text())
    rows = [report.Row(**r) for r in result["points"]]
    base = next(r for r in rows if r.task == "all" and r.mode == "baseline")
    assert base.accuracy >= 0.5  # the reference model answers this example
    assert not report.baseline_too_low(rows)
    assert "kvcompose - snapkv" in report.headline(rows)
    # The same points with a model that solves only 1 in 5 uncompressed: a warning, no target.
    low = [dataclasses.replace(r, accuracy=0.2) if r is base else r for r in rows]
    assert report.baseline_too_low(low)
    lines = report.headline(low).splitlines()
    assert lines == [
        "- uncompressed accuracy: 20.0 %",
        f"- **warning**: {report.LOW_BASELINE}",
    ]


def test_missing_matplotlib_fails_before_the_run(
    model_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    # None in sys.modules makes `import matplotlib` raise ImportError, as when it is absent.
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    out = tmp_path / "out"
    assert main(["eval", "--model", model_path, *ARGS, "--out", str(out)]) == 2
    assert "PNG plots need matplotlib" in capsys.readouterr().err
    assert not out.exists()  # nothing ran


def test_dtype_loads_the_checkpoint_as_asked(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from kvpack.eval.cli import load_model
    from kvpack.eval.model import reference_config

    config = reference_config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    LlamaForCausalLM(config).half().save_pretrained(tmp_path)  # an fp16 checkpoint
    assert next(load_model(str(tmp_path), "cpu").parameters()).dtype == torch.float32
    assert next(load_model(str(tmp_path), "cpu", "auto").parameters()).dtype == torch.float16
    assert next(load_model(str(tmp_path), "cpu", "bfloat16").parameters()).dtype == torch.bfloat16


def test_task_generator_plugin_runs_its_own_examples(tmp_path: Path) -> None:
    """A plug-in's examples (its own prompts, its own split) are what the run answers: the
    reference model solves its single needles uncompressed."""
    argv = [
        "eval", "--model", "reference", "--task-generator", "tests.eval.plugin_tasks:needles",
        "--length", "256", "--samples", "4", "--policies", "kvcompose", "--ratios", "0.5",
        "--modes", "evict", "--threads", "2", "--no-progress", "--no-plots", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["task_generator"] == "tests.eval.plugin_tasks:needles"
    assert result["tasks"] == ["plugin_needle"]
    rows = {(r["task"], r["mode"]): r for r in result["points"]}
    assert set(rows) == {(t, m) for t in ("plugin_needle", "all") for m in ("baseline", "evict")}
    baseline = rows["plugin_needle", "baseline"]
    assert baseline["samples"] == 4 and baseline["accuracy"] == 1.0


def test_split_is_the_examples_not_a_token() -> None:
    from kvpack.eval.runner import split_example
    from kvpack.eval.tasks import Example

    ex = Example("mine", [10, 11, 12, 13, 14], [15, 16], context_len=3)  # no QUERY token at all
    context, question, answer = split_example(ex, None, torch.device("cpu"))
    assert context.tolist() == [[10, 11, 12]] and question.tolist() == [[13, 14]]
    assert answer.tolist() == [[15, 16]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task-generator", "no_such_module_kv:fn"], "cannot import 'no_such_module_kv'"),
        (["--task-generator", "tests.eval.plugin_tasks:missing"], "no callable 'missing'"),
        (["--task-generator", "tests.eval.plugin_tasks"], "expected module:function"),
        (["--task-generator", "tests.eval.plugin_tasks:wrong_ids"], "token id 600, outside"),
        (["--task-generator", "tests.eval.plugin_tasks:needles", "--tasks", "x"], "unknown task"),
        (["--tasks", "single_filler,nope"], "unknown tasks ['nope']"),
    ],
)
def test_task_generator_errors_name_the_problem(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--model", "reference", "--samples", "1", "--length", "64", "--no-plots"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_budget_points_stay_within_their_budget(model_path: str, tmp_path: Path) -> None:
    """--modes budget: one point per target x combo policy, each stored within fp16 / target,
    and results.md compares it with the best fixed point storing no more."""
    extra = ["--modes", "evict+lossy,budget", "--targets", "8,16", "--ratios", "0.5,0.875"]
    result = run_eval(model_path, tmp_path, *extra, "--no-plots")
    budget = [r for r in result["points"] if r["mode"] == "budget" and r["task"] == "all"]
    assert sorted(r["eb"] for r in budget) == ["budget 16x", "budget 8x"]
    for r in budget:
        target = float(r["eb"].removeprefix("budget ").removesuffix("x"))
        assert r["stored_bytes"] <= r["fp16_bytes"] / target and r["x_ratio"] >= target
    assert "Budget mode against the best fixed point" in (tmp_path / "results.md").read_text()


def test_policy_settings_in_the_sweep(model_path: str, tmp_path: Path) -> None:
    """name:setting=value runs the policy with those settings under its own label; the same
    settings as the defaults give the same accuracy and bytes as the plain name."""
    spec = "kvpack:allocation=uniform:kernel_size=3"
    extra = ["--policies", f"kvpack,{spec},kvpack:allocation=mass", "--modes", "evict"]
    result = run_eval(model_path, tmp_path, *extra, "--no-plots")
    rows = {(r["policy"], r["ratio"]): r for r in result["points"] if r["task"] == "all"}
    assert {p for p, _ in rows} == {"none", "kvpack", spec, "kvpack:allocation=mass"}
    for ratio in (0.5, 0.75, 0.875, 0.9375):
        same, plain = rows[spec, ratio], rows["kvpack", ratio]
        assert (same["accuracy"], same["stored_bytes"]) == (
            plain["accuracy"],
            plain["stored_bytes"],
        )
    argv = ["eval", "--model", model_path, *ARGS, "--out", str(tmp_path), "--no-plots"]
    assert main([*argv, "--policies", "kvpack:allocation=nope"]) == 2
