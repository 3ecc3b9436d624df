"""PNG plots of `kvpack eval` rows. matplotlib is imported only here, when plotting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvpack.eval.report import ALL, Row


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "PNG plots need matplotlib: pip install matplotlib (or run with --no-plots)"
        ) from exc
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_ratio(rows: list[Row], path: Path) -> None:
    """One panel per task family plus the average: eviction-only accuracy against token ratio,
    one line per policy, the uncompressed accuracy dashed."""
    plt = _pyplot()
    tasks = [*dict.fromkeys(r.task for r in rows if r.task != ALL), ALL]
    cols = min(4, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        evict = [r for r in rows if r.task == task and r.mode == "evict"]
        for policy in dict.fromkeys(r.policy for r in evict):
            pts = sorted((r.ratio, r.accuracy) for r in evict if r.policy == policy)
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=policy)
        base = [r.accuracy for r in rows if r.task == task and r.mode == "baseline"]
        if base:
            ax.axhline(base[0], color="gray", ls="--", lw=1, label="uncompressed")
        ax.set_title("average over tasks" if task == ALL else task, fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("token ratio (fraction evicted)", fontsize=8)
        ax.set_ylabel("exact match", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[len(tasks) - 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_vs_bytes(rows: list[Row], path: Path) -> None:
    """Average accuracy against compression (fp16 bytes / stored bytes, log scale): one series
    per mode (eviction-only and eviction x lossy per policy)."""
    plt = _pyplot()
    avg = [r for r in rows if r.task == ALL]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[Row]] = {}
    for r in avg:
        if r.mode == "baseline":
            continue
        name = r.mode if r.policy == "none" else f"{r.mode} ({r.policy})"
        if r.mode == "evict+lossy":
            name += f" {r.eb}"
        series.setdefault(name, []).append(r)
    for name, pts in series.items():
        pts.sort(key=lambda r: r.x_ratio)
        style = "--" if name.startswith("evict (") and "kvcompose" not in name else "-"
        ax.plot(
            [r.x_ratio for r in pts], [r.accuracy for r in pts], style, marker="o", ms=3, label=name
        )
    for r in avg:
        if r.mode == "baseline":
            ax.scatter(
                [r.x_ratio],
                [r.accuracy],
                color="black",
                marker="*",
                s=80,
                zorder=3,
                label="uncompressed (lossless)",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression vs fp16 (x, stored container bytes)")
    ax.set_ylabel("exact match (average over tasks)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
