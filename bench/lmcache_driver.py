"""Drives LMCache 0.5.6 through its own loading path; runs with LMCache's python.

    <lmcache-venv>/bin/python -m kvpack.bench.lmcache_driver

kvpack's LMCache tests and ``kvpack bench --only lmcache`` run this in LMCache's environment
(its pins differ from kvpack's) and talk to it in JSON lines: one command per line on stdin, one
answer per line on stdout (LMCache's own output is moved to stderr). Nothing here builds a
connector or serde by hand:

- ``open`` writes an LMCache YAML config and loads it the way the vLLM/SGLang integrations do
  (``load_engine_config_with_overrides``), then builds LMCache's ``StorageManager``, which creates
  its backends -- for ``remote_storage_plugins`` that is RemoteBackend -> ConnectorManager ->
  DynamicConnectorAdapter -> kvpack's connector.
- ``put`` / ``get`` / ``contains`` go through that StorageManager (``batched_put``; ``get``, or
  with ``batched`` LMCacheEngine.retrieve's ``get_block_mapping`` + ``batched_get``;
  ``contains``); ``call`` awaits a connector method (list, ping, exists) on
  LMCache's event loop through the RemoteBackend's connection, as LMCache's health checks do.
- ``serde`` parses ``--l2-adapter`` specs with LMCache's CLI parser and builds each serde with
  ``create_serde_processor``, then runs its serialize / deserialize tasks on chunks allocated by
  LMCache's multiprocess L1 memory manager.
- ``bench`` times the kvpack plugin against LMCache's local disk backend on the same chunks.

Chunks hold synthetic KV (kvpack.bench.lossy.synthetic_kv: outlier key channels, smooth values)
written through kvpack.client.lmcache.layout views. Tensors a test compares are saved with
torch.save to the path the command names: ``{chunk hash: [group tensors]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# The plugin modules first: LMCache's init_logger clears a logger's handlers when they load.
import kvpack.client.lmcache.connector
import kvpack.client.lmcache.serde  # noqa: F401  (registers the "kvpack" serde type)
from kvpack.bench.lossy import synthetic_kv
from kvpack.client.lmcache import layout

PLUGIN_LOGGERS = ("kvpack.client.lmcache.connector", "kvpack.client.lmcache.serde")


class _Captured(logging.Handler):
    """Keeps the plugin's log records so a test can assert on them (``logs`` command)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"level": record.levelname, "message": record.getMessage()})


CAPTURED = _Captured()


class Engine:
    """One LMCache StorageManager built from a config + model metadata spec."""

    def __init__(
        self,
        config: dict[str, Any] | None,
        model: dict[str, Any],
        workdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        """``config``: the YAML file's content; or None and ``env``: LMCACHE_* variables (the
        other way vLLM and SGLang deployments configure LMCache)."""
        from lmcache.v1.config import load_engine_config_with_overrides
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        if config is not None:
            path = workdir / f"lmcache-{id(self)}.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            self.config = load_engine_config_with_overrides(config_file_path=str(path))
        else:
            saved = dict(os.environ)
            os.environ.update(env or {})
            try:
                self.config = load_engine_config_with_overrides()
            finally:
                os.environ.clear()
                os.environ.update(saved)
        self.dtype = getattr(torch, model["dtype"])
        self.metadata = LMCacheMetadata(
            model_name=model["model_name"],
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=self.dtype,
            kv_shape=tuple(model["kv_shape"]),  # (layers, 2 or 1, chunk, kv heads, head size)
            use_mla=bool(model.get("use_mla", False)),
            chunk_size=int(self.config.chunk_size),
        )
        self.manager = StorageManager(self.config, self.metadata, EventManager())

    # -- chunks -----------------------------------------------------------------------------

    def key(self, chunk: dict[str, Any]) -> Any:
        from lmcache.utils import CacheEngineKey, LayerCacheEngineKey

        args = (self.metadata.model_name, 1, 0, int(chunk["hash"]), self.dtype)
        if "layer" in chunk:
            return LayerCacheEngineKey(*args, layer_id=int(chunk["layer"]))
        return CacheEngineKey(*args)

    def shapes(self, chunk: dict[str, Any]) -> tuple[str, list[torch.Size]]:
        fmt = chunk.get("fmt", "KV_MLA_FMT" if self.metadata.use_mla else "KV_2LTD")
        tokens = int(chunk.get("tokens", self.metadata.chunk_size))
        _, _, _, heads, head_size = self.metadata.kv_shape
        hidden = heads * head_size
        if fmt in ("KV_2LTD", "KV_MLA_FMT"):
            return fmt, list(self.metadata.get_shapes(tokens))
        if fmt == "KV_T2D":
            return fmt, [torch.Size([tokens, 2, hidden])]
        return fmt, [torch.Size([2, tokens, hidden])]

    def allocate(self, chunk: dict[str, Any]) -> Any:
        from lmcache.v1.memory_management import MemoryFormat

        fmt, shapes = self.shapes(chunk)
        obj = self.manager.allocate(shapes, [self.dtype] * len(shapes), MemoryFormat[fmt])
        if obj is None:
            raise RuntimeError("LMCache's CPU buffer is full")
        head_size = int(self.metadata.kv_shape[4])
        for i in range(len(shapes)):
            fill(obj.get_tensor(i), fmt, head_size, int(chunk.get("seed", chunk["hash"])))
        return obj

    def wait_stored(self, keys: list[Any], timeout: float = 120.0) -> bool:
        """Until every key is found (LMCache's puts are asynchronous, and its RemoteBackend does
        not track batched puts as tasks); False if some are still missing after ``timeout``."""
        deadline = time.monotonic() + timeout
        pending = list(keys)
        while pending:
            pending = [k for k in pending if not self.manager.contains(k)]
            if pending and time.monotonic() > deadline:
                return False
            if pending:
                time.sleep(0.002)
        return True

    def retrieve(self, keys: list[Any]) -> list[Any]:
        """Memory objects (None for a miss) the way LMCacheEngine.retrieve finds them: which
        backend holds which prefix of the chunks (``get_block_mapping``), then one
        ``batched_get`` per backend. (A bare ``batched_get`` without a location stops at the
        CPU backend's answer, even an all-miss one.)"""
        mapping = self.manager.get_block_mapping([(k, 0, 0) for k in keys])
        found: dict[Any, Any] = {}
        for location, blocks in mapping.items():
            held = [k for k, _, _ in blocks]
            objs = self.manager.batched_get(keys=held, location=location)
            found.update(zip(held, objs, strict=True))
        return [found.get(k) for k in keys]

    def connection(self) -> Any:
        for name, backend in self.manager.storage_backends.items():
            if name.startswith("RemoteBackend"):
                return backend.connection
        raise RuntimeError("no RemoteBackend in this LMCache config")


def fill(tensor: torch.Tensor, fmt: str, head_size: int, seed: int) -> None:
    """Synthetic KV into a chunk tensor, layer by layer, through the plugin's layout views."""
    views = layout.layers(tensor, fmt, head_size)
    _, h, t, d = views[0][0].shape
    ks, vs = synthetic_kv(len(views), h, d, t, tensor.dtype, seed=seed)
    for (k_view, v_view), k, v in zip(views, ks, vs, strict=True):
        k_view.copy_(k)
        v_view.copy_(v[..., : v_view.shape[-1]])


def tensors_of(obj: Any) -> list[torch.Tensor]:
    return [obj.get_tensor(i).clone() for i in range(len(obj.get_shapes()))]


# -- commands ------------------------------------------------------------------------------


class Driver:
    def __init__(self) -> None:
        self.engines: dict[str, Engine] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="kvpack-lmcache-"))

    def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        engine = Engine(cmd.get("config"), cmd["model"], self.workdir, cmd.get("env"))
        self.engines[cmd["name"]] = engine
        return {"backends": list(engine.manager.storage_backends)}

    def put(self, cmd: dict[str, Any]) -> dict[str, Any]:
        engine = self.engines[cmd["name"]]
        keys, objs, saved = [], [], {}
        for chunk in cmd["chunks"]:
            obj = engine.allocate(chunk)
            saved[int(chunk["hash"])] = tensors_of(obj)
            keys.append(engine.key(chunk))
            objs.append(obj)
        start = time.perf_counter()
        engine.manager.batched_put(keys, objs)  # takes over the objects' references
        stored = engine.wait_stored(keys, float(cmd.get("wait", 120.0)))
        seconds = time.perf_counter() - start
        if cmd.get("save"):
            torch.save(saved, cmd["save"])
        nbytes = sum(t.nbytes for ts in saved.values() for t in ts)
        return {"stored": stored, "seconds": seconds, "bytes": nbytes}

    def get(self, cmd: dict[str, Any]) -> dict[str, Any]:
        engine = self.engines[cmd["name"]]
        keys = [engine.key(c) for c in cmd["chunks"]]
        start = time.perf_counter()
        if cmd.get("batched"):
            objs = engine.retrieve(keys)
        else:
            objs = [engine.manager.get(k) for k in keys]
        seconds = time.perf_counter() - start
        saved = {}
        for chunk, obj in zip(cmd["chunks"], objs, strict=True):
            if obj is not None:
                saved[int(chunk["hash"])] = tensors_of(obj)
                obj.ref_count_down()
        if cmd.get("save"):
            torch.save(saved, cmd["save"])
        return {"hits": [o is not None for o in objs], "seconds": seconds}

    def contains(self, cmd: dict[str, Any]) -> dict[str, Any]:
        engine = self.engines[cmd["name"]]
        return {"found": [bool(engine.manager.contains(engine.key(c))) for c in cmd["chunks"]]}

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Await a connector method on LMCache's loop, through the RemoteBackend's connection."""
        engine = self.engines[cmd["name"]]
        conn = engine.connection()
        args = [engine.key(c) for c in cmd.get("chunks", [])]
        coro = getattr(conn, cmd["method"])(*args)
        result = asyncio.run_coroutine_threadsafe(coro, engine.manager.loop).result(60)
        return {"result": result}

    def close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.engines.pop(cmd["name"]).manager.close()
        return {}

    def logs(self, cmd: dict[str, Any]) -> dict[str, Any]:
        records, CAPTURED.records = CAPTURED.records, []
        return {"records": records}

    def versions(self, cmd: dict[str, Any]) -> dict[str, Any]:
        import google.protobuf
        import grpc
        import lmcache
        import numpy

        return {
            "lmcache": getattr(lmcache, "__version__", "?"),
            "protobuf": google.protobuf.__version__,
            "grpcio": grpc.__version__,
            "numpy": numpy.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }

    def serde(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from kvpack.bench import lmcache_serde

        return lmcache_serde.run(cmd, self.workdir)

    def bench(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from kvpack.bench import lmcache_timing

        return lmcache_timing.run(self, cmd)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    # Answers go to the real stdout; everything else printing to fd 1 (LMCache's banner and
    # log handlers) goes to stderr so it cannot corrupt the protocol.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for name in PLUGIN_LOGGERS:
        logging.getLogger(name).addHandler(CAPTURED)
    driver = Driver()
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            reply = {"ok": True, **getattr(driver, cmd["op"])(cmd)}
        except Exception as e:  # the test sees the error instead of a hung pipe
            import traceback

            reply = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(),
            }
        answers.write(json.dumps(reply, default=str) + "\n")
    for engine in driver.engines.values():
        engine.manager.close()


if __name__ == "__main__":
    main()
