"""What the benchmark ran on: CPU model, cores, library versions, device and load average.

Printed first by `kvpack bench` because every figure after it is only meaningful for this machine
(and, on a shared host, for the load at the time).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("torch", "grpcio", "numpy", "zstandard")


def cpu_model() -> str:
    """The first "model name" in /proc/cpuinfo, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def source_state() -> str:
    """ "<commit>" or "<commit> + uncommitted changes to a.py, b.py" for the code being measured
    (the tree is shared, so a run may include others' work in progress); "unknown" outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.split("\n")
    except OSError:
        return "unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    if not head:
        return "unknown"
    if not changed:
        return head
    shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    return f"{head} + uncommitted changes to {shown}"


def describe(device: str) -> dict[str, Any]:
    """Machine facts for the report; `device` is the torch device codec parts ran on."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "device": device,
        "load_average": load_average(),
        "source": source_state(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def line(info: dict[str, Any]) -> str:
    """One human line: "machine: <cpu> | 2 cores (2 usable, 1 torch thread) | torch 2.x ..."."""
    versions = " ".join(f"{k} {v}" for k, v in info["versions"].items())
    device = info["device"] + (f" ({info['gpu']})" if "gpu" in info else "")
    load = " ".join(f"{x:.2f}" for x in info["load_average"]) or "n/a"
    return (
        f"machine: {info['cpu']} | {info['cores']} cores ({info['usable_cores']} usable, "
        f"{info['torch_threads']} torch threads) | python {info['python']} {versions} | "
        f"device {device} | load average {load} | source {info['source']}"
    )
