"""The foundation contract: one installable package, checked-in generated code, the CLI, serve."""

from __future__ import annotations

import filecmp
import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import kvpack

ROOT = Path(__file__).resolve().parents[1]
KVPACK = Path(sys.executable).with_name("kvpack")


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """A fresh generation from proto/ must equal the checked-in kvpack/v1 byte for byte.

    gen_proto.sh runs the pinned generator (scripts/requirements/protoc.txt) from its cached
    environment, built on first use; KVPACK_PROTOC_PYTHON must not point it elsewhere here."""
    env = {k: v for k, v in os.environ.items() if k != "KVPACK_PROTOC_PYTHON"}
    subprocess.run(
        [str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    fresh = tmp_path / "kvpack/v1"
    checked_in = ROOT / "kvpack/v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in checked_in.iterdir() if p.is_file())
    _match, mismatch, errors = filecmp.cmpfiles(fresh, checked_in, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with scripts/gen_proto.sh: {mismatch}"


def test_version_and_help() -> None:
    out = subprocess.run([str(KVPACK), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"kvpack {kvpack.__version__}"
    out = subprocess.run([str(KVPACK), "--help"], capture_output=True, text=True, check=True)
    assert "serve" in out.stdout
    out = subprocess.run(
        [str(KVPACK), "serve", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--host", "--port", "--metrics-port"):
        assert option in out.stdout
    # `python -m kvpack` is the same entry point.
    out = subprocess.run(
        [sys.executable, "-m", "kvpack", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"kvpack {kvpack.__version__}"


def _imported_by(module: str, prefixes: tuple[str, ...]) -> list[str]:
    """Modules starting with any of `prefixes` that importing `module` pulls in (fresh process)."""
    code = (
        f"import sys, {module}; "
        f"print(' '.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_layering_codec_is_pure_and_server_client_independent() -> None:
    """codec pulls in no gRPC/network/metrics layers; the engine (which both server and client
    run) pulls in neither of them, nor the store or metrics layers; server and client never
    import each other."""
    assert (
        _imported_by(
            "kvpack.codec", ("grpc", "redis", "prometheus_client", "kvpack.server", "kvpack.client")
        )
        == []
    )
    assert (
        _imported_by(
            "kvpack.engine", ("redis", "prometheus_client", "kvpack.server", "kvpack.client")
        )
        == []
    )
    assert _imported_by("kvpack.client", ("kvpack.server",)) == []
    assert _imported_by("kvpack.server", ("kvpack.client",)) == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kvpack's wheel, built from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("kvpack-*.whl")
    return built


@pytest.mark.slow
def test_wheel_installs_one_top_level_package(wheel: Path) -> None:
    """The wheel holds kvpack/ and its metadata only: no generic top-level server/client/codec."""
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
        names = set(zf.namelist())
    assert tops == {"kvpack", f"kvpack-{kvpack.__version__}.dist-info"}, tops
    for module in (
        "kvpack/codec/__init__.py",
        "kvpack/engine/__init__.py",
        "kvpack/server/__init__.py",
        "kvpack/client/__init__.py",
        "kvpack/v1/kvpack_pb2.py",
        "kvpack/v1/kvpack_pb2.pyi",
        "kvpack/py.typed",
        "kvpack/eval/reference/model.safetensors",
        "kvpack/eval/reference/config.json",
    ):
        assert module in names, module


@pytest.mark.slow
def test_reference_model_loads_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel into a fresh venv, kvpack.eval loads the reference model from
    beside its module (the weights ship as package data). The venv sees this environment's
    torch and transformers through a .pth line, not its kvpack (an editable finder that a
    plain path line does not run)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # From elsewhere and ignoring installed packages: pip must not take a kvpack it can see from
    # here (this checkout's egg-info, PYTHONPATH) for the installed one.
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--ignore-installed", str(wheel)],
        check=True, capture_output=True, cwd=tmp_path, env=clean,
    )  # fmt: skip
    # After the install: pip would take this environment's kvpack for an installed one.
    deps = {p for p in sys.path if p.endswith("site-packages")}
    (Path(site) / "deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    code = (
        "import kvpack, torch\n"
        "from kvpack.eval.model import reference_model, reference_model_path\n"
        "print(kvpack.__file__); print(reference_model_path()); m = reference_model()\n"
        "print(m.config.num_hidden_layers, m(torch.tensor([[1, 2, 3]])).logits.shape[-1])"
    )
    # -I: no PYTHONPATH, user site or current directory can put another kvpack first.
    run = subprocess.run(
        [str(python), "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout.split("\n")
    assert out[0].startswith(site) and out[1].startswith(site), out
    layers, vocab = map(int, out[2].split())
    assert layers >= 1 and vocab > 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_health_serving_within_30_seconds() -> None:
    port, metrics_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            str(KVPACK),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        status = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, (
            proc.stdout.read().decode() if proc.poll() is not None and proc.stdout else status
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, "SIGTERM must drain and exit cleanly"
