"""Client test fixtures: a tiny random Llama, servers on loopback in a background thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tests.client.client_support import ServerThread, build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama() -> Any:
    return build_tiny_llama()


@pytest.fixture
def context_ids() -> torch.Tensor:
    """``[1, 24]`` context token ids."""
    return torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """One open server (no auth, memory store) shared by a test module."""
    running = ServerThread()
    yield running
    running.stop()


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """Factory of servers with config overrides, stopped at teardown."""
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        started.append(ServerThread(**overrides))
        return started[-1]

    yield start
    for running in started:
        running.stop()
