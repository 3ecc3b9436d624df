"""`kvpack serve`: run the gRPC server until SIGTERM/SIGINT, then drain gracefully."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from kvpack.errors import KVPackError
from kvpack.server.config import ServerConfig

log = logging.getLogger("kvpack.server")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add every server option (see ServerConfig) to ``parser``."""
    parser.description = (
        "Start the kvpack gRPC server (health + reflection on; /metrics on its own port). "
        "Options come from flags, then KVPACK_* environment variables, then the --config TOML "
        "file, then defaults. Binds 127.0.0.1 unless --host is given."
    )
    ServerConfig.add_arguments(parser)


async def serve(config: ServerConfig) -> None:
    """Serve until a signal arrives; then health NOT_SERVING and ``stop(grace)``."""
    from kvpack.server.app import KVPackServer

    server = KVPackServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining for up to %.1f s", config.grace)
    await server.stop()
    log.info("stopped")


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvpack serve`; returns the process exit code."""
    try:
        config = ServerConfig.from_sources(args)
    except KVPackError as e:
        print(f"kvpack serve: {e.message}")
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config))
    except KVPackError as e:
        log.error("%s", e.message)
        return 1
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    return 0
