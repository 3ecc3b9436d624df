"""The driver's ``serde`` command: kvpack's and LMCache's own serdes on the same chunks.

Runs in LMCache's environment (see lmcache_driver.py). Each case is one chunk
``[2, L, T, H x d]`` (or MLA ``[1, L, T, d]``) of synthetic KV in LMCache's multiprocess L1
memory. Every serde named in ``serdes`` (kvpack, fp8, ...) is configured the way LMCache's
``lmcache server`` configures one -- an ``--l2-adapter`` JSON spec parsed by LMCache's own
argument parser -- and built by its serde factory (``create_serde_processor``). Its serialize
and deserialize tasks run through the returned SerdeProcessor. LMCache's "naive" storage keeps
the raw bytes, reported as ``raw_bytes``.

Command: ``{"op": "serde", "cases": [{"name", "dtype", "layers", "heads", "head_dim",
"tokens", "seed", "fmt"}], "serdes": [{"label": "kvpack", "type": "kvpack", ...kwargs},
{"label": "fp8", "type": "fp8"}], "save": path}``. Answer per case and serde label: bytes
written (what L2 stores), buffer bytes (the estimate LMCache allocates), seconds to serialize /
deserialize. Saved: ``{case: {"original": [t], label: [t]}}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from kvpack.bench.lmcache_driver import fill


def _wait(query: Any, task: int, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while (result := query(task)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"serde task {task} unfinished after {timeout} s")
        time.sleep(0.001)
    return bool(result)


def _serdes(specs: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """label -> SerdeProcessor, from --l2-adapter specs through LMCache's parser and factory."""
    from lmcache.v1.distributed.l2_adapters.config import (
        add_l2_adapters_args,
        parse_args_to_l2_adapters_config,
    )
    from lmcache.v1.distributed.serde import create_serde_processor

    parser = argparse.ArgumentParser()
    add_l2_adapters_args(parser)
    argv = []
    for spec in specs:
        serde = {k: v for k, v in spec.items() if k != "label"}
        adapter = {"type": "fs", "base_path": str(workdir / f"l2-{spec['label']}")}
        argv += ["--l2-adapter", json.dumps({**adapter, "serde": serde})]
    adapters = parse_args_to_l2_adapters_config(parser.parse_args(argv)).adapters
    return {
        spec["label"]: create_serde_processor(a.serde_config)
        for spec, a in zip(specs, adapters, strict=True)
    }


def run(cmd: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.distributed.config import L1MemoryManagerConfig
    from lmcache.v1.distributed.memory_manager.l1_memory_manager import L1MemoryManager
    from lmcache.v1.distributed.serde import serialized_layout_desc

    memory = L1MemoryManager(
        L1MemoryManagerConfig(
            size_in_bytes=int(cmd.get("l1_bytes", 256 << 20)), use_lazy=False, shm_name=""
        )
    )
    serdes = _serdes(cmd["serdes"], workdir)
    answers, saved = [], {}
    try:
        for case in cmd["cases"]:
            dtype = getattr(torch, case["dtype"])
            mla = case.get("fmt") == "KV_MLA_FMT"
            hidden = case["head_dim"] * (1 if mla else case["heads"])
            shape = torch.Size([1 if mla else 2, case["layers"], case["tokens"], hidden])
            desc = MemoryLayoutDesc([shape], [dtype])
            _, (src,) = memory.allocate(desc, 1)
            fill(src.get_tensor(0), case.get("fmt", "KV_2LTD"), case["head_dim"], case["seed"])
            key = ObjectKey(
                chunk_hash=case["seed"].to_bytes(8, "little"), model_name="m", kv_rank=0
            )
            out: dict[str, Any] = {"name": case["name"], "raw_bytes": src.get_size()}
            saved[case["name"]] = {"original": [src.get_tensor(0).clone()]}
            for name, serde in serdes.items():
                _, (buf,) = memory.allocate(serialized_layout_desc(desc, serde), 1)
                _, (dst,) = memory.allocate(desc, 1)
                buffer_bytes = buf.get_size()
                t0 = time.perf_counter()
                ok = _wait(
                    serde.query_serialize_result, serde.submit_serialize([src], [buf], [key])
                )
                t1 = time.perf_counter()
                written = buf.get_size()  # narrowed by LMCache to what serialize wrote
                ok = ok and _wait(
                    serde.query_deserialize_result, serde.submit_deserialize([buf], [dst], [key])
                )
                t2 = time.perf_counter()
                out[name] = {
                    "ok": ok,
                    "stored_bytes": written,
                    "buffer_bytes": buffer_bytes,
                    "serialize_s": t1 - t0,
                    "deserialize_s": t2 - t1,
                }
                saved[case["name"]][name] = [dst.get_tensor(0).clone()]
                memory.free([buf, dst])
            memory.free([src])
            answers.append(out)
    finally:
        for serde in serdes.values():
            serde.close()
    if cmd.get("save"):
        torch.save(saved, cmd["save"])
    return {"cases": answers}
