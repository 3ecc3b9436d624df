"""LMCache's environment and the driver process in it, seen from kvpack's own environment.

LMCache 0.5.6 pins numpy<=2.2.6, protobuf<7 and grpcio==1.78.0; kvpack's development
environment runs protobuf 7. The LMCache tests and ``kvpack bench --only lmcache`` therefore run
LMCache in its own virtual environment and talk to kvpack.bench.lmcache_driver in it:

- :func:`lmcache_python` finds that environment's python: ``KVPACK_LMCACHE_PYTHON`` if set,
  else the one scripts/cached_venv.py builds (once, ~/.cache/kvpack/venvs/lmcache-<hash>) from
  what ``pip install -c constraints.txt 'kvpack[lmcache]'`` resolves: kvpack's dependencies plus
  the ``lmcache`` extra, read from pyproject.toml. kvpack itself is not installed there: the
  driver imports the checkout's kvpack (:class:`Driver` puts it on PYTHONPATH), so the
  environment survives code changes and is rebuilt only when a pin changes.
- :class:`Driver` runs the driver and exchanges JSON lines with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import kvpack


def _checkout() -> Path | None:
    root = Path(kvpack.__file__).resolve().parents[1]
    ok = (root / "pyproject.toml").exists() and (root / "scripts" / "cached_venv.py").exists()
    return root if ok else None


#: The checkout when kvpack runs from one (editable install); None for an installed wheel.
ROOT = _checkout()


def requirements(root: Path) -> list[str]:
    """kvpack's dependencies plus its ``lmcache`` extra, from ``root``/pyproject.toml."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["lmcache"]]


def lmcache_python(explicit: str | os.PathLike[str] | None = None) -> Path:
    """A python with LMCache installed (see the module docstring). Builds the cached
    environment on first use: minutes, progress on stderr."""
    chosen = explicit or os.environ.get("KVPACK_LMCACHE_PYTHON")
    if chosen:
        return Path(chosen)
    if ROOT is None:
        raise RuntimeError(
            "no LMCache environment: pass --lmcache-python (or set KVPACK_LMCACHE_PYTHON) to a "
            "python where `pip install -c constraints.txt 'kvpack[lmcache]'` ran"
        )
    cmd = [sys.executable, str(ROOT / "scripts" / "cached_venv.py"), "lmcache"]
    cmd += ["-c", str(ROOT / "constraints.txt"), "--", *requirements(ROOT)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def build_seconds(python: Path) -> str:
    """How long the cached environment of ``python`` took to build (its marker's note)."""
    marker = python.parents[1] / ".kvpack-complete"
    return marker.read_text().strip() if marker.exists() else "unknown (not a cached env)"


class DriverError(RuntimeError):
    """The driver answered a command with an error (message and traceback from LMCache's side)."""


class Driver:
    """kvpack.bench.lmcache_driver running under ``python``; ``send`` one command, get its
    answer. LMCache's output goes to the file ``log`` (a file, not a pipe: nobody drains a
    pipe while tests run)."""

    def __init__(self, python: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = log.open("w")
        self._paths = tempfile.TemporaryDirectory(prefix="kvpack-path-")
        # Only kvpack on the path, not the checkout root (its top-level folders would shadow
        # same-named modules).
        os.symlink(Path(kvpack.__file__).resolve().parent, Path(self._paths.name) / "kvpack")
        child_env = {
            **os.environ,
            **(env or {}),
            "PYTHONPATH": self._paths.name,
            "LMCACHE_LOG_LEVEL": os.environ.get("LMCACHE_LOG_LEVEL", "WARNING"),
            "LMCACHE_TRACK_USAGE": "false",
        }
        self.proc = subprocess.Popen(
            [str(python), "-m", "kvpack.bench.lmcache_driver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=child_env,
        )

    def log_tail(self, chars: int = 6000) -> str:
        """The end of LMCache's output so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def send(self, op: str, **fields: Any) -> dict[str, Any]:
        """Run one command; DriverError if it failed, RuntimeError if the driver died."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"LMCache driver exited ({self.proc.wait()}) during {op!r}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok"):
            raise DriverError(f"{op}: {reply['error']}\n{reply['trace']}")
        return reply

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        self._paths.cleanup()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
