"""Shared pieces of the LMCache plugin tests: LMCache configs, model shapes, bound checks,
and restarting a `kvpack serve` on the same port."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvpack.client.lmcache import chunk_codec, layout
from kvpack.codec import QuantSettings
from tests.codec.test_quant import check_bound
from tests.deploy.deploy_support import KVPACK, Served, _wait_serving

PLUGIN = "remote_storage_plugin.kvpack."


def plugin_config(
    target: str, token: str | None, chunk_size: int = 256, **options: Any
) -> dict[str, Any]:
    """An LMCache config that offloads through the kvpack plugin only (no CPU hot cache, so
    every get reaches kvpack)."""
    extra: dict[str, Any] = {
        PLUGIN + "module_path": "kvpack.client.lmcache.connector",
        PLUGIN + "class_name": "KVPackConnector",
        PLUGIN + "target": target,
        **({PLUGIN + "token": token} if token else {}),
        **{PLUGIN + k: v for k, v in options.items()},
    }
    return {
        "chunk_size": chunk_size,
        "local_cpu": False,
        "max_local_cpu_size": 0.25,
        "save_unfull_chunk": True,
        "remote_serde": "naive",
        "remote_storage_plugins": ["kvpack"],
        "extra_config": extra,
    }


def quant_of(options: dict[str, Any]) -> QuantSettings:
    """The QuantSettings a plugin config's ``quant.*`` options produce."""
    fields = {k.removeprefix("quant."): v for k, v in options.items() if k.startswith("quant.")}
    return QuantSettings(**{"k_window": 0, "v_window": 0, **fields})


@dataclass(frozen=True)
class Model:
    """LMCache model metadata for the driver: kv_shape = (layers, 2 or 1, chunk, heads, d)."""

    name: str
    dtype: str
    layers: int
    heads: int
    head_dim: int
    chunk_size: int = 256
    mla: bool = False

    def spec(self) -> dict[str, Any]:
        kv = (self.layers, 1 if self.mla else 2, self.chunk_size, self.heads, self.head_dim)
        return {"model_name": self.name, "dtype": self.dtype, "kv_shape": kv, "use_mla": self.mla}


def check_chunks(
    original: dict[int, list[torch.Tensor]],
    decoded: dict[int, list[torch.Tensor]],
    fmts: dict[int, str],
    head_dim: int,
    quant: QuantSettings,
) -> int:
    """Every decoded chunk matches its original within kvpack's error bound (exactly for
    lossless); returns the number of values checked."""
    checked = 0
    assert set(decoded) == set(original), (sorted(decoded), sorted(original))
    for h, groups in original.items():
        # The block size the plugin fitted to this chunk's token count.
        used = chunk_codec.chunk_settings(quant, layout.num_tokens(groups[0].shape, fmts[h]))
        for src, dst in zip(groups, decoded[h], strict=True):
            assert src.shape == dst.shape and src.dtype == dst.dtype, (src.shape, dst.shape)
            pairs = zip(
                layout.layers(src, fmts[h], head_dim),
                layout.layers(dst, fmts[h], head_dim),
                strict=True,
            )
            for (k, v), (k2, v2) in pairs:
                if quant.mode == "lossless":
                    assert torch.equal(k, k2) and torch.equal(v, v2)
                else:
                    check_bound(k, k2, "k", used)
                    if v.numel():  # an MLA layer's V is empty
                        check_bound(v, v2, "v", used)
                checked += k.numel() + v.numel()
    return checked


def restart(served: Served, args: list[str], log: Path) -> Served:
    """`kvpack serve` again on ``served``'s ports (after it was killed), SERVING on return."""
    cmd = [str(KVPACK), "serve", "--host", "127.0.0.1", "--port", str(served.port)]
    cmd += ["--metrics-port", str(served.metrics_port), "--grace", "1", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    again = Served(proc, served.port, served.metrics_port, log)
    _wait_serving(again, timeout=60)
    return again
