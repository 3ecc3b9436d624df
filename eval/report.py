"""Aggregate per-example outcomes into points and write them: markdown tables, JSON, CSV.

A row is one (task, mode, policy, ratio, eb) point: exact-match accuracy over its examples, its
binomial standard error, and mean stored bytes against the fp16 cache. Task ``all`` is the
macro average over task families (each family weighs the same).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvpack.eval.runner import PointResult

ALL = "all"


@dataclass(frozen=True)
class Row:
    """One aggregated point. ``x_ratio`` = fp16 bytes / stored bytes; ``stderr`` = the
    binomial standard error of ``accuracy`` over ``samples`` examples."""

    task: str
    mode: str
    policy: str
    ratio: float
    eb: str
    accuracy: float
    stderr: float
    samples: int
    stored_bytes: float
    fp16_bytes: float
    x_ratio: float


FIELDS = list(Row.__dataclass_fields__)


def _row(
    task: str, key: tuple[str, str, float, str], acc: float, n: int, stored: float, fp16: float
) -> Row:
    mode, policy, ratio, eb = key
    stderr = math.sqrt(acc * (1 - acc) / n) if n else 0.0
    return Row(
        task,
        mode,
        policy,
        ratio,
        eb,
        acc,
        stderr,
        n,
        stored,
        fp16,
        fp16 / stored if stored else 0.0,
    )


def aggregate(results: list[PointResult]) -> list[Row]:
    """Per-task rows, then the ``all`` rows (macro average over tasks), in first-seen order."""
    groups: dict[tuple[str, str, str, float, str], list[PointResult]] = defaultdict(list)
    for r in results:
        s = r.spec
        groups[r.task, s.mode, s.policy, s.ratio, s.quant_label].append(r)
    rows: list[Row] = []
    by_point: dict[tuple[str, str, float, str], list[Row]] = defaultdict(list)
    for (task, mode, policy, ratio, eb), items in groups.items():
        key = (mode, policy, ratio, eb)
        n = len(items)
        row = _row(
            task,
            key,
            sum(r.correct for r in items) / n,
            n,
            sum(r.stored_bytes for r in items) / n,
            sum(r.fp16_bytes for r in items) / n,
        )
        rows.append(row)
        by_point[key].append(row)
    for key, task_rows in by_point.items():
        k = len(task_rows)
        n = sum(r.samples for r in task_rows)
        acc = sum(r.accuracy for r in task_rows) / k
        stored = sum(r.stored_bytes for r in task_rows) / k
        fp16 = sum(r.fp16_bytes for r in task_rows) / k
        rows.append(_row(ALL, key, acc, n, stored, fp16))
    return rows


def _fmt_ratio(r: float) -> str:
    return f"{r:g}"


def eviction_table(rows: list[Row], task: str = ALL) -> str:
    """Markdown: accuracy (%) of each policy (rows) at each ratio (columns), eviction only."""
    evict = [r for r in rows if r.task == task and r.mode == "evict"]
    base = next((r for r in rows if r.task == task and r.mode == "baseline"), None)
    ratios = sorted({r.ratio for r in evict})
    policies = list(dict.fromkeys(r.policy for r in evict))
    cell = {(r.policy, r.ratio): r for r in evict}
    head = "| policy | " + " | ".join(_fmt_ratio(x) for x in ratios) + " |"
    lines = [head, "|---|" + "---:|" * len(ratios)]
    if base is not None:
        lines.append(
            "| uncompressed | " + " | ".join(f"{100 * base.accuracy:.1f}" for _ in ratios) + " |"
        )
    for p in policies:
        cells = [f"{100 * cell[p, x].accuracy:.1f}" if (p, x) in cell else "" for x in ratios]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_table(rows: list[Row], ratio: float) -> str:
    """Markdown: accuracy (%) per task family of each policy at one ratio (eviction only)."""
    evict = [r for r in rows if r.mode == "evict" and r.ratio == ratio and r.task != ALL]
    tasks = list(dict.fromkeys(r.task for r in evict))
    policies = list(dict.fromkeys(r.policy for r in evict))
    cell = {(r.policy, r.task): r.accuracy for r in evict}
    lines = ["| policy | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for p in policies:
        lines.append(
            f"| {p} | "
            + " | ".join(f"{100 * cell.get((p, t), math.nan):.0f}" for t in tasks)
            + " |"
        )
    return "\n".join(lines)


def bytes_table(rows: list[Row], task: str = ALL) -> str:
    """Markdown: every point with its stored bytes (mean per example) and x-ratio vs fp16."""
    lines = [
        "| mode | policy | ratio | eb | accuracy % | ± | stored KiB | x vs fp16 |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.task != task:
            continue
        lines.append(
            f"| {r.mode} | {r.policy} | {_fmt_ratio(r.ratio)} | {r.eb or '-'} | "
            f"{100 * r.accuracy:.1f} | {100 * r.stderr:.1f} | {r.stored_bytes / 1024:.1f} | "
            f"{r.x_ratio:.2f} |"
        )
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    path.write_text(json.dumps({**meta, "points": [asdict(r) for r in rows]}, indent=1) + "\n")


def write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


#: Below this uncompressed accuracy the model does not solve the tasks, and comparing
#: compressions of its (mostly wrong) answers says nothing about the compressions.
MIN_BASELINE = 0.5
LOW_BASELINE = (
    f"the uncompressed accuracy is below {100 * MIN_BASELINE:.0f} %: this model does not solve "
    "these tasks at this length, so no target is evaluated (use a model that does, or shorter "
    "prompts)"
)


def baseline_accuracy(rows: list[Row], task: str = ALL) -> float | None:
    """The uncompressed accuracy of ``task`` (default: the average over tasks), None if absent."""
    return next((r.accuracy for r in rows if r.task == task and r.mode == "baseline"), None)


def baseline_too_low(rows: list[Row]) -> bool:
    """True when the uncompressed accuracy (average over tasks) is below :data:`MIN_BASELINE`."""
    base = baseline_accuracy(rows)
    return base is not None and base < MIN_BASELINE


def headline(rows: list[Row], reference: str = "kvcompose") -> str:
    """Markdown bullets: the issue #8 targets measured on these rows (average over tasks).

    - ``reference`` against every other eviction policy at ratios >= 0.75 (mean difference);
    - the largest evict+lossy compression vs fp16 within 5 % relative accuracy loss;
    - lossy vs fixed-width compression at every setting with >= 0.97 normalised accuracy.
    """
    avg = [r for r in rows if r.task == ALL]
    base = baseline_accuracy(rows) or 0.0
    evict = {(r.policy, r.ratio): r.accuracy for r in avg if r.mode == "evict"}
    lines = [f"- uncompressed accuracy: {100 * base:.1f} %"]
    if baseline_too_low(rows):
        return "\n".join([*lines, f"- **warning**: {LOW_BASELINE}"])
    high = sorted({ratio for (_, ratio) in evict if ratio >= 0.75})
    for policy in dict.fromkeys(p for (p, _) in evict):
        if policy == reference or not all((reference, x) in evict for x in high):
            continue
        diffs = [(x, evict[reference, x] - evict[policy, x]) for x in high if (policy, x) in evict]
        if diffs:
            cells = ", ".join(f"{x:g}: {100 * d:+.1f}" for x, d in diffs)
            mean = 100 * sum(d for _, d in diffs) / len(diffs)
            lines.append(
                f"- {reference} - {policy} at ratios >= 0.75: mean {mean:+.1f} points ({cells})"
            )
    ok = [r for r in avg if r.mode == "evict+lossy" and base and r.accuracy >= 0.95 * base]
    if ok:
        best = max(ok, key=lambda r: r.x_ratio)
        lines.append(
            f"- evict+lossy within 5 % relative loss: best {best.x_ratio:.1f}x vs fp16 "
            f"({best.policy} {best.ratio:g}, {best.eb}, accuracy {100 * best.accuracy:.1f} %)"
        )
    elif any(r.mode == "evict+lossy" for r in avg):
        lines.append("- evict+lossy: no point within 5 % relative loss")
    lines += budget_lines(rows)
    fixed = {r.eb: r for r in avg if r.mode == "fixed"}
    for r in avg:
        if r.mode == "lossy" and r.eb in fixed:
            norm = r.accuracy / base if base else 0.0
            lines.append(
                f"- lossy {r.eb}: {r.x_ratio:.2f}x vs fixed-width {fixed[r.eb].x_ratio:.2f}x = "
                f"{r.x_ratio / fixed[r.eb].x_ratio:.2f}x, normalised accuracy {norm:.3f}"
            )
    return "\n".join(lines)


#: Modes whose points are fixed (policy, ratio, bound) settings, for the budget comparison.
FIXED_MODES = ("baseline", "evict", "lossy", "fixed", "evict+lossy")


def best_fixed_within(rows: list[Row], stored_bytes: float, task: str = ALL) -> Row | None:
    """The most accurate fixed point of ``task`` storing at most ``stored_bytes`` (ties: the
    smaller one), or None when every fixed point stores more."""
    fits = [
        r
        for r in rows
        if r.task == task and r.mode in FIXED_MODES and r.stored_bytes <= stored_bytes
    ]
    return max(fits, key=lambda r: (r.accuracy, -r.stored_bytes), default=None)


def budget_table(rows: list[Row], results: list[PointResult] | None = None, task: str = ALL) -> str:
    """Markdown: each budget point (accuracy, bytes, the mean eviction ratio it chose when
    ``results`` are given) against the best fixed (policy, ratio, bound) point storing no more,
    and the accuracy difference to it."""
    base = baseline_accuracy(rows, task) or 0.0
    chosen: dict[tuple[str, str], list[float]] = {}
    for res in results or []:
        if res.spec.mode == "budget" and (task == ALL or res.task == task):
            chosen.setdefault((res.spec.policy, res.spec.quant_label), []).append(res.token_ratio)
    lines = [
        "| budget | policy | accuracy % | ± | of uncompressed | x vs fp16 | chosen ratio (mean) "
        "| best fixed point storing no more | its accuracy % | budget - fixed |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if r.task != task or r.mode != "budget":
            continue
        ratios = chosen.get((r.policy, r.eb), [])
        mean = f"{sum(ratios) / len(ratios):.3f}" if ratios else "-"
        best = best_fixed_within(rows, r.stored_bytes, task)
        name = "none"
        if best is not None:
            name = f"{best.mode} {best.policy} {best.ratio:g} {best.eb} ({best.x_ratio:.1f}x)"
        fixed_acc = f"{100 * best.accuracy:.1f}" if best else "-"
        diff = f"{100 * (r.accuracy - best.accuracy):+.1f}" if best else "-"
        norm = f"{100 * r.accuracy / base:.0f} %" if base else "-"
        lines.append(
            f"| {r.eb.removeprefix('budget ')} | {r.policy} | {100 * r.accuracy:.1f} | "
            f"{100 * r.stderr:.1f} | {norm} | {r.x_ratio:.2f} | {mean} | {name} | {fixed_acc} "
            f"| {diff} |"
        )
    return "\n".join(lines)


def budget_lines(rows: list[Row]) -> list[str]:
    """Headline bullets of the budget points (issue #23): accuracy relative to uncompressed,
    and against the best fixed point storing no more (dominates: not below it by more than
    one standard error)."""
    avg = [r for r in rows if r.task == ALL]
    base = baseline_accuracy(rows) or 0.0
    out = []
    for r in avg:
        if r.mode != "budget":
            continue
        best = best_fixed_within(rows, r.stored_bytes)
        norm = r.accuracy / base if base else 0.0
        text = (
            f"- {r.eb} ({r.policy}): {100 * r.accuracy:.1f} % ± {100 * r.stderr:.1f} at "
            f"{r.x_ratio:.1f}x vs fp16, {100 * norm:.0f} % of uncompressed"
        )
        if best is None:
            text += "; no fixed point stores as little"
        else:
            verdict = "dominates" if r.accuracy >= best.accuracy - r.stderr else "below"
            text += (
                f"; best fixed point storing no more: {best.mode} {best.policy} {best.ratio:g} "
                f"{best.eb} {100 * best.accuracy:.1f} % at {best.x_ratio:.1f}x ({verdict})"
            )
        out.append(text)
    return out
