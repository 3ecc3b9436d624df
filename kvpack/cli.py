"""The `kvpack` command: one entry point, one subcommand per capability.

Each subcommand lives with the code it drives (`kvpack.server.cli`, `kvpack.client.cli`, ...) and
exposes ``configure(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so `kvpack --help` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from kvpack import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("kvpack.server.cli", "start the kvpack gRPC server"),
    "compress": ("kvpack.client.cli", "compress a KV cache from a safetensors file via a server"),
    "fetch": ("kvpack.client.cli", "fetch and decode a stored entry into a safetensors file"),
    "eval": ("kvpack.eval.cli", "accuracy against compression on a model (tables, JSON, plots)"),
    "bench": ("kvpack.bench.cli", "codec, eviction and service throughput on this machine"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpack",
        description="KV-cache compression for LLM inference: KVCompose eviction + KVComp "
        "lossy encoding, served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"kvpack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the subcommand being run is imported and configured; the rest list their help line.
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
