"""A `kvpack serve` subprocess on 127.0.0.1 for the service benchmarks.

A separate process (not a thread of the benchmark) so that the server's codec work and the
clients do not share one interpreter lock, as in a real deployment on one host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import IO

_SERVING = re.compile(r"serving on (\S+:\d+)")


@contextlib.asynccontextmanager
async def server(workers: int = 0, start_timeout_s: float = 60.0) -> AsyncIterator[str]:
    """Start `kvpack serve` on a free loopback port with a memory store; yields "host:port".
    workers: codec thread pool size (0 = the server's default)."""
    cmd = [sys.executable, "-m", "kvpack", "serve", "--port", "0", "--metrics-port", "0"]
    cmd += ["--log-level", "INFO"] + (["--workers", str(workers)] if workers else [])
    with tempfile.TemporaryFile("w+") as log:
        # The log goes to a file, not a pipe: nobody reads a pipe while clients run, and a full
        # one would stall the server.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            yield await _address(proc, log, start_timeout_s)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _address(proc: subprocess.Popen[bytes], log: IO[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log.seek(0)
        text = log.read()
        match = _SERVING.search(text)
        if match:
            return str(match.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"kvpack serve exited with {proc.returncode}:\n{text[-2000:]}")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"kvpack serve did not start within {timeout_s:.0f} s")
