#!/usr/bin/env python3
"""Create (once) and find a virtual environment for a pinned tool set, outside the checkout.

Usage: scripts/cached_venv.py NAME [-c CONSTRAINTS] -- REQUIREMENT [REQUIREMENT ...]
Prints the environment's python. Requirements are pip arguments (``pkg==1.2`` or ``-r FILE``).

Why: some tools cannot live in kvpack's own .venv because their pins conflict with it (the
protobuf 6 generator of kvpack/v1, LMCache 0.5.6 for the LMCache plugin tests). Each gets its
own environment under ``$KVPACK_CACHE_DIR`` (default ``~/.cache/kvpack``), named
``venvs/NAME-<hash>`` where the hash covers the requirements, the constraints file contents and
the interpreter version: a fresh clone reuses an environment built by an earlier run, and any
change to the pins builds a new one. Environments of the same NAME unused for
``PRUNE_AFTER_DAYS`` are deleted after a successful build.

Stdlib only: scripts/gen_proto.sh runs this before any kvpack environment exists.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PRUNE_AFTER_DAYS = 7
MARKER = ".kvpack-complete"  # written last: a folder without it is a build that died midway
# pip prints warnings about optional local mirror folders some machines lack; they are noise.
_NOISE = ("WARNING: Location",)


def cache_root() -> Path:
    return Path(os.environ.get("KVPACK_CACHE_DIR") or Path.home() / ".cache" / "kvpack")


_FILE_FLAGS = ("-r", "-c", "--requirement", "--constraint")


def env_key(requirements: list[str], constraints: Path | None) -> str:
    """16 hex digits over what decides what gets installed: the interpreter, the pip arguments
    and the contents (not the paths: clones live in different folders) of the files they name
    and of the constraints file."""
    h = hashlib.sha256()
    h.update(f"{sys.version_info[:3]} {sys.platform}\n".encode())
    names_file = False
    for arg in requirements:
        h.update(Path(arg).read_bytes() if names_file else arg.encode() + b"\n")
        names_file = arg in _FILE_FLAGS
    if constraints is not None:
        h.update(constraints.read_bytes())
    return h.hexdigest()[:16]


def _pip(python: Path, args: list[str]) -> None:
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shown = "\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith(_NOISE))
    if proc.returncode:
        raise SystemExit(f"cached_venv: pip install {' '.join(args)} failed:\n{shown}")
    if shown.strip():
        print(shown, file=sys.stderr)


def ensure(name: str, requirements: list[str], constraints: Path | None = None) -> Path:
    """The python of environment NAME with ``requirements`` installed (built if missing)."""
    root = cache_root() / "venvs"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{name}-{env_key(requirements, constraints)}"
    python = folder / "bin" / "python"
    with open(root / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs building the same env: one builds
        if not (folder / MARKER).exists():
            shutil.rmtree(folder, ignore_errors=True)
            started = time.monotonic()
            print(f"cached_venv: building {folder} (first use; minutes)...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
            extra = ["-c", str(constraints)] if constraints else []
            _pip(python, [*extra, *requirements])
            seconds = time.monotonic() - started
            (folder / MARKER).write_text(f"built in {seconds:.0f} s\n")
            print(f"cached_venv: built {folder.name} in {seconds:.0f} s", file=sys.stderr)
            _prune(root, name, keep=folder)
        os.utime(folder / MARKER)  # "last used", for pruning
    return python


def _prune(root: Path, name: str, keep: Path) -> None:
    cutoff = time.time() - PRUNE_AFTER_DAYS * 86400
    for other in root.glob(f"{name}-*"):
        if other == keep or not other.is_dir():
            continue
        marker = other / MARKER  # no marker: maybe being built right now by another run
        if marker.exists() and marker.stat().st_mtime < cutoff:
            shutil.rmtree(other, ignore_errors=True)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(usage=__doc__.split("\n")[2].removeprefix("Usage: "))
    parser.add_argument("name")
    parser.add_argument("-c", "--constraints", type=Path)
    args = parser.parse_args(argv[:split])
    requirements = argv[split + 1 :]
    if not requirements:
        parser.error("no requirements after --")
    print(ensure(args.name, requirements, args.constraints))


if __name__ == "__main__":
    main()
