"""Server configuration: one dataclass, filled from flags > KVPACK_* environment > TOML > defaults.

Every field is one `kvpack serve` flag (``--store-bytes``), one environment variable
(``KVPACK_STORE_BYTES``) and one TOML key (``store_bytes`` or ``store-bytes``, top level or under
``[server]``). Byte sizes accept suffixes (``512MiB``, ``2GiB``, ``1e9``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvpack.errors import InvalidArgument

GiB = 1 << 30
_STORES = ("memory", "disk", "redis")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SIZE = re.compile(r"^\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648; ``"500MB"`` -> 500000000; plain numbers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a byte size: {text!r} (e.g. 512MiB, 2GiB, 1000000)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit.endswith("ib"):
        scale = 1024 ** ("kmgt".index(unit[0]) + 1)
    else:
        scale = _UNITS[unit.rstrip("b")] if unit != "b" else 1
    return int(number * scale)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclasses.dataclass
class ServerConfig:
    """Everything `kvpack serve` can be told. ``help`` metadata is the flag's help text."""

    host: str = dataclasses.field(
        default="127.0.0.1",
        metadata={"help": "address to bind (loopback by default; 0.0.0.0 to serve the network)"},
    )
    port: int = dataclasses.field(default=50051, metadata={"help": "gRPC port (0 = any free)"})
    metrics_port: int = dataclasses.field(
        default=9464,
        metadata={"help": "Prometheus /metrics HTTP port on the same host (0 disables)"},
    )
    store: str = dataclasses.field(
        default="memory", metadata={"help": "entry store: " + ", ".join(_STORES)}
    )
    store_bytes: int = dataclasses.field(
        default=2 * GiB,
        metadata={
            "help": "memory store byte budget; least recently used entries are evicted "
            "(0 = unbounded)",
            "bytes": True,
        },
    )
    disk_path: str = dataclasses.field(
        default="", metadata={"help": "directory of the disk store (required with --store disk)"}
    )
    redis_url: str = dataclasses.field(
        default="redis://127.0.0.1:6379/0", metadata={"help": "Redis URL of the redis store"}
    )
    redis_ttl: float = dataclasses.field(
        default=0.0, metadata={"help": "seconds a Redis entry lives (0 = no expiry)"}
    )
    redis_prefix: str = dataclasses.field(
        default="kvpack:", metadata={"help": "prefix of every Redis key this server writes"}
    )
    workers: int = dataclasses.field(
        default_factory=_default_workers,
        metadata={"help": "codec thread pool size (default min(4, CPU count))"},
    )
    max_concurrent_streams: int = dataclasses.field(
        default=64,
        metadata={"help": "concurrent Compress/Fetch/Put streams; more get RESOURCE_EXHAUSTED"},
    )
    max_streams_per_tenant: int = dataclasses.field(
        default=32,
        metadata={
            "metavar": "STREAMS",
            "help": "concurrent Compress/Fetch/Put streams of one tenant (the open server is "
            "one tenant); more get RESOURCE_EXHAUSTED, so one tenant cannot take every slot",
        },
    )
    max_unauthenticated_streams: int = dataclasses.field(
        default=16,
        metadata={
            "help": "concurrent streaming calls without a token (health Watch, reflection); "
            "more get RESOURCE_EXHAUSTED, so they never use the tenants' capacity"
        },
    )
    idle_timeout: float = dataclasses.field(
        default=30.0,
        metadata={
            "metavar": "SECONDS",
            "help": "seconds a Compress or Put upload may go without a message before it is "
            "ended (DEADLINE_EXCEEDED) and its slot and memory are freed",
        },
    )
    max_buffered_bytes: int = dataclasses.field(
        default=4 * GiB,
        metadata={
            "help": "server-wide cap on bytes buffered by uploads in flight; past it uploads "
            "get RESOURCE_EXHAUSTED",
            "bytes": True,
        },
    )
    max_request_bytes: int = dataclasses.field(
        default=2 * GiB,
        metadata={"help": "raw bytes one Compress or Put request may upload", "bytes": True},
    )
    max_layers: int = dataclasses.field(default=512, metadata={"help": "most layers per cache"})
    max_heads: int = dataclasses.field(default=256, metadata={"help": "most query or KV heads"})
    max_head_dim: int = dataclasses.field(default=1024, metadata={"help": "largest head_dim"})
    max_seq_len: int = dataclasses.field(
        default=1 << 20, metadata={"help": "longest context (tokens)"}
    )
    max_batch_size: int = dataclasses.field(default=64, metadata={"help": "largest batch size"})
    grace: float = dataclasses.field(
        default=10.0, metadata={"help": "seconds running calls get to finish on SIGTERM/SIGINT"}
    )
    log_level: str = dataclasses.field(
        default="INFO", metadata={"help": "log level: " + ", ".join(_LOG_LEVELS)}
    )
    auth_tokens: str = dataclasses.field(
        default="",
        metadata={"help": "comma-separated tenant:token pairs; none = open server (warned)"},
    )
    auth_tokens_file: str = dataclasses.field(
        default="", metadata={"help": "file of tenant:token pairs, one per line (# comments)"}
    )
    tls_cert: str = dataclasses.field(default="", metadata={"help": "PEM server certificate"})
    tls_key: str = dataclasses.field(default="", metadata={"help": "PEM server private key"})
    tls_client_ca: str = dataclasses.field(
        default="", metadata={"help": "PEM CA bundle; when set, clients must present a cert (mTLS)"}
    )

    def validate(self) -> None:
        """Raise InvalidArgument naming the first inconsistent option."""
        if self.store not in _STORES:
            raise InvalidArgument(f"--store must be one of {list(_STORES)}, got {self.store!r}")
        if self.store == "disk" and not self.disk_path:
            raise InvalidArgument("--store disk needs --disk-path")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise InvalidArgument(f"--log-level must be one of {list(_LOG_LEVELS)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgument("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be 0..65535")
        for name in (
            "workers",
            "max_concurrent_streams",
            "max_streams_per_tenant",
            "max_unauthenticated_streams",
            "max_buffered_bytes",
            "max_request_bytes",
            "max_layers",
            "max_heads",
            "max_head_dim",
            "max_seq_len",
            "max_batch_size",
        ):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
        if self.store_bytes < 0 or self.redis_ttl < 0 or self.grace < 0:
            raise InvalidArgument("--store-bytes, --redis-ttl and --grace must be >= 0")
        if not self.idle_timeout > 0:
            raise InvalidArgument("--idle-timeout must be > 0 seconds")

    # -- sources -------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field; flags default to "unset" so lower-priority sources can fill in."""
        parser.add_argument(
            "--config",
            metavar="TOML",
            default=None,
            help="TOML file with options (flags > KVPACK_* environment > file > defaults)",
        )
        defaults = cls()
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            env = "KVPACK_" + f.name.upper()
            default = getattr(defaults, f.name)
            shown = _show(default, bool(f.metadata.get("bytes")))
            parser.add_argument(
                flag,
                dest=f.name,
                default=argparse.SUPPRESS,
                metavar=f.metadata.get("metavar", f.name.split("_")[-1].upper()),
                help=f"{f.metadata.get('help', '')} [default: {shown}; env {env}]",
            )

    @classmethod
    def from_sources(
        cls,
        args: argparse.Namespace | Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ServerConfig:
        """Merge flags (``args``) > ``environ`` (KVPACK_*) > TOML (``--config`` /
        KVPACK_CONFIG) > defaults, coerce types, validate."""
        flags = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
        env = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        config_path = flags.pop("config", None) or env.get("KVPACK_CONFIG")
        if config_path:
            values.update(_read_toml(Path(config_path)))
        names = {f.name for f in dataclasses.fields(cls)}
        for name in names:
            key = "KVPACK_" + name.upper()
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in flags.items() if k in names and v is not None})
        config = cls(**{k: _coerce(cls, k, v) for k, v in values.items()})
        config.validate()
        return config

    @property
    def limits_dict(self) -> dict[str, int]:
        """Dimension limits by name (for messages and Info)."""
        return {
            "max_layers": self.max_layers,
            "max_heads": self.max_heads,
            "max_head_dim": self.max_head_dim,
            "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size,
        }


def _show(value: object, is_bytes: bool) -> str:
    if is_bytes and isinstance(value, int) and value and value % GiB == 0:
        return f"{value // GiB}GiB"
    if value == "":
        return "unset"
    return str(value)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"cannot read config file {path}: {e}") from e
    section = data.get("server", data)
    if not isinstance(section, dict):
        raise InvalidArgument(f"{path}: [server] must be a table")
    out = {}
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    for key, value in section.items():
        name = key.replace("-", "_")
        if name not in names:
            raise InvalidArgument(f"{path}: unknown option {key!r}")
        out[name] = value
    return out


def _coerce(cls: type[ServerConfig], name: str, value: Any) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}[f.type]
    try:
        if kind is int:
            return parse_bytes(value) if f.metadata.get("bytes") else int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"option {name}: {e}") from e
