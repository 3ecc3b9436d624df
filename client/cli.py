"""`kvpack compress` and `kvpack fetch`: KV caches in safetensors files <-> a kvpack server.

Files hold one tensor per layer: ``keys.{l}`` and ``values.{l}`` ``[B, Hkv, n, d]``; a compress
input may add ``scores`` ``[L, B, H, n]`` or ``window_queries`` ``[L, B, Hq, W, d]``; outputs
add ``indices.{l}`` ``[B, Hkv, b_l]`` (kept positions). Both subcommands are served by this module:
``configure`` reads which one from the parser's name, ``run`` from the parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kvpack.errors import KVPackError

#: Transfers smaller than this get no progress bar.
PROGRESS_MIN_BYTES = 8 << 20


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--tls-ca", help="PEM root CA verifying the server (enables TLS)")
    parser.add_argument("--tls-cert", help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", help="PEM client private key (mTLS)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root CAs")
    parser.add_argument("--timeout", type=float, default=30.0, help="base deadline (s)")
    parser.add_argument(
        "--timeout-per-mib", type=float, default=0.5, help="extra deadline per MiB moved (s)"
    )


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"{what} must be NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def configure_compress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="safetensors file with keys.{l} / values.{l}")
    _connection_args(parser)
    parser.add_argument(
        "--policy", default=None, help="eviction policy (or 'none'; default: the server's, kvpack)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, help="fraction of KV entries removed, [0, 1)")
    budget.add_argument("--n-keep", type=int, help="token slots kept, summed over layers")
    target = parser.add_argument_group(
        "byte budget", "kvpack chooses the ratio and error bounds (instead of --ratio/--n-keep)"
    )
    target.add_argument(
        "--target-ratio", type=float, help="stored container this many times smaller than fp16"
    )
    target.add_argument("--target-bytes", type=int, help="stored container at most this size")
    target.add_argument(
        "--max-ratio", type=float, help="quality floor: evict at most this fraction of entries"
    )
    target.add_argument(
        "--max-error-bound", type=float, help="quality floor: error bounds at most this"
    )
    parser.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE", help="policy setting"
    )
    parser.add_argument(
        "--quant", action="append", default=[], metavar="NAME=VALUE",
        help="encoding setting: a QuantSettings field (mode, k_error_bound, v_error_bound, "
        "k_grouping, block_tokens, k_window, v_window, entropy) or its short name (eb sets both "
        "bounds, K, V, group, block, kwin, vwin)",
    )  # fmt: skip
    parser.add_argument("--key", help="store key (default: content-derived)")
    parser.add_argument("--model", help="model fingerprint for content keys (name@revision)")
    parser.add_argument("--no-store", action="store_true", help="do not store the encoding")
    parser.add_argument(
        "--output", type=Path, help="write the composite cache (keys/values/indices) here"
    )


def configure_fetch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", help="store key")
    _connection_args(parser)
    parser.add_argument("--output", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--layers", help="half-open layer range START:END (default: all)")
    parser.add_argument("--raw", action="store_true", help="write the encoded container as is")


def _quant(items: list[str]) -> Any:
    """``QuantSettings`` of the ``--quant NAME=VALUE`` items (None when there are none)."""
    from kvpack.codec.quant_settings import QuantSettings

    if not items:
        return None
    try:
        return QuantSettings.from_options(_pairs(items, "--quant").items())[0]
    except ValueError as e:
        raise SystemExit(f"--quant: {e}") from None


def _client(args: argparse.Namespace) -> Any:
    from kvpack.client import TLS, KVPackClient

    token = Path(args.token_file).read_text().strip() if args.token_file else None
    tls: Any = None
    if args.tls_ca or args.tls_cert:
        tls = TLS(root_ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    elif args.tls:
        tls = True
    return KVPackClient(
        args.target, token=token, tls=tls, timeout=args.timeout,
        timeout_per_mib=args.timeout_per_mib,
    )  # fmt: skip


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on stderr for transfers of at least PROGRESS_MIN_BYTES, else nothing."""
    if total < PROGRESS_MIN_BYTES:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="B", unit_scale=True, file=sys.stderr) as bar:
        yield bar.update


def _layers(tensors: dict[str, torch.Tensor], name: str) -> list[torch.Tensor]:
    layers: list[torch.Tensor] = []
    while f"{name}.{len(layers)}" in tensors:
        layers.append(tensors[f"{name}.{len(layers)}"])
    if not layers:
        raise SystemExit(f"input has no {name}.0")
    return layers


def run_compress(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(args.input))
    keys, values = _layers(tensors, "keys"), _layers(tensors, "values")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    quant = _quant(args.quant)
    with _client(args) as client, _progress(total, "upload") as progress:
        result = client.compress(
            keys, values, scores=tensors.get("scores"),
            window_queries=tensors.get("window_queries"), policy=args.policy, ratio=args.ratio,
            n_keep=args.n_keep, policy_settings=_pairs(args.setting, "--setting"),
            quant=quant, store=not args.no_store, key=args.key, model=args.model,
            return_cache=args.output is not None, progress=progress,
            target_ratio=args.target_ratio, target_bytes=args.target_bytes,
            max_ratio=args.max_ratio, max_error_bound=args.max_error_bound,
        )  # fmt: skip
    if args.output is not None:
        out: dict[str, torch.Tensor] = {}
        for layer, (k, v, idx) in enumerate(
            zip(result.keys, result.values, result.indices, strict=True)
        ):
            out |= {f"keys.{layer}": k, f"values.{layer}": v, f"indices.{layer}": idx}
        save_file({n: t.contiguous() for n, t in out.items()}, str(args.output))
    print(
        json.dumps(
            {
                "key": result.key,
                "kept_tokens": [s.kept_tokens for s in result.layers],
                "token_ratio": result.token_ratio,
                "input_bytes": result.input_bytes,
                "stored_bytes": result.stored_bytes,
                "compression_ratio": result.compression_ratio,
                "timings_seconds": result.timings_seconds,
                **({"budget": dataclasses.asdict(result.budget)} if result.budget else {}),
            },
            indent=2,
        )
    )
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    layers = None
    if args.layers:
        start, sep, end = args.layers.partition(":")
        if not sep:
            raise SystemExit(f"--layers must be START:END, got {args.layers!r}")
        layers = (int(start), int(end))
    with _client(args) as client:
        size = client.stat(args.key).stored_bytes
        with _progress(size, "fetch") as progress:
            blob = client.fetch_bytes(args.key, layers, progress=progress)
    if args.raw:
        args.output.write_bytes(blob)
        print(json.dumps({"key": args.key, "stored_bytes": len(blob), "output": str(args.output)}))
        return 0
    from kvpack import codec

    decoded = codec.decode(blob)
    out: dict[str, torch.Tensor] = {}
    for layer, k, v, idx in zip(
        decoded.layers, decoded.keys, decoded.values, decoded.indices, strict=True
    ):
        out |= {f"keys.{layer}": k, f"values.{layer}": v}
        if idx is not None:
            out[f"indices.{layer}"] = idx
    save_file({n: t.contiguous() for n, t in out.items()}, str(args.output))
    print(json.dumps({"key": args.key, "layers": decoded.layers, "output": str(args.output)}))
    return 0


_COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "compress": (configure_compress, run_compress),
    "fetch": (configure_fetch, run_fetch),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of the subcommand named by ``parser.prog`` ("kvpack compress" or
    "kvpack fetch")."""
    name = parser.prog.split()[-1]
    if name not in _COMMANDS:
        raise ValueError(f"kvpack.client.cli serves compress and fetch, not {name!r}")
    _COMMANDS[name][0](parser)
    parser.set_defaults(client_command=name)


def run(args: argparse.Namespace) -> int:
    """Runs the configured subcommand; errors print the server's message and return 1."""
    try:
        return _COMMANDS[args.client_command][1](args)
    except KVPackError as e:
        print(f"kvpack {args.client_command}: {type(e).__name__}: {e.message}", file=sys.stderr)
        return 1
