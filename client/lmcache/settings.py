"""The kvpack plugin's options, read from LMCache's ``extra_config``.

Every option is ``remote_storage_plugin.<name>.<option>`` (``<name>`` is the entry in
``remote_storage_plugins``, e.g. ``kvpack``), next to LMCache's own ``module_path`` and
``class_name`` for that plugin. Values may be YAML scalars or strings (environment overrides).

    target          host:port of the kvpack service (required)
    token           bearer token (the tenant), or token_file: a file holding it
    tls             true: TLS with system roots; tls_root_ca / tls_cert / tls_key (mTLS) /
                    tls_server_name: TLS with these files (any of them turns TLS on)
    quant.<field>   kvpack.codec.QuantSettings field: mode (lossy | fixed | lossless),
                    k_error_bound, v_error_bound, k_grouping, block_tokens, k_window, v_window,
                    entropy. Windows default to 0 here (not the codec's 128/256): a chunk is
                    a slice of a longer prefix, not a sequence whose newest tokens matter more.
    head_dim        split each token's hidden vector into heads of this size (default: the
                    model's head size from LMCache's metadata)
    key_prefix      prefix of every kvpack key (default "lmcache/")
    timeout         seconds per call (default 5) + timeout_per_mib per MiB moved (default 0.5)
    retries         retries of idempotent calls on UNAVAILABLE (default 1)
    workers         threads that encode, decode and call kvpack (default 2)
    down_for        seconds to answer "miss" without calling after kvpack was unreachable
                    (default 1): an outage must not cost every lookup a connect timeout. The
                    next call opens a fresh channel: gRPC's own reconnect backoff grows to 120 s,
                    which would leave a restarted service unused for minutes.
    log_interval    seconds between two log lines of the same kind of failure (default 30)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvpack.client.channel import TLS
from kvpack.client.lmcache.keys import check_prefix
from kvpack.codec import QuantSettings
from kvpack.codec.coerce import coerce_setting

PLUGIN_OPTION = "remote_storage_plugin.{name}.{option}"
_LMCACHE_OWN = ("module_path", "class_name")
_SCALARS: dict[str, type] = {
    "target": str,
    "token": str,
    "token_file": str,
    "tls": bool,
    "tls_root_ca": str,
    "tls_cert": str,
    "tls_key": str,
    "tls_server_name": str,
    "head_dim": int,
    "key_prefix": str,
    "timeout": float,
    "timeout_per_mib": float,
    "retries": int,
    "workers": int,
    "down_for": float,
    "log_interval": float,
}
#: Codec defaults the plugin changes (see the module docstring).
QUANT_DEFAULTS = {"k_window": 0, "v_window": 0}


@dataclass(frozen=True)
class PluginSettings:
    """Parsed options (see the module docstring); ``tls`` is None for plaintext."""

    target: str
    token: str | None = None
    tls: TLS | bool | None = None
    quant: QuantSettings = field(default_factory=lambda: QuantSettings(k_window=0, v_window=0))
    head_dim: int | None = None
    key_prefix: str = "lmcache/"
    timeout: float = 5.0
    timeout_per_mib: float = 0.5
    retries: int = 1
    workers: int = 2
    down_for: float = 1.0
    log_interval: float = 30.0


def plugin_options(extra_config: Mapping[str, object] | None, name: str) -> dict[str, object]:
    """The options of plugin ``name`` from LMCache's ``extra_config`` (prefix stripped)."""
    prefix = PLUGIN_OPTION.format(name=name, option="")
    return {k[len(prefix) :]: v for k, v in (extra_config or {}).items() if k.startswith(prefix)}


def parse(options: Mapping[str, object], name: str = "kvpack") -> PluginSettings:
    """PluginSettings from plugin ``name``'s options; ValueError naming the option at fault."""

    def where(option: str) -> str:
        return PLUGIN_OPTION.format(name=name, option=option)

    scalars: dict[str, object] = {}
    quant: dict[str, object] = dict(QUANT_DEFAULTS)
    for option, raw in options.items():
        if option in _LMCACHE_OWN:
            continue
        if option.startswith("quant."):
            quant[option.removeprefix("quant.")] = raw
        elif option in _SCALARS:
            scalars[option] = coerce_setting(where(option), _SCALARS[option], raw)
        else:
            known = sorted([*_SCALARS, "quant.<field>"])
            raise ValueError(f"unknown option {where(option)!r} (known options: {known})")
    if not scalars.get("target"):
        raise ValueError(f"{where('target')} is required: host:port of the kvpack service")
    try:
        settings = QuantSettings.from_mapping(quant)
    except ValueError as e:
        raise ValueError(f"{where('quant')}.*: {e}") from None
    token = scalars.pop("token", None)
    token_file = scalars.pop("token_file", None)
    if token is not None and token_file is not None:
        raise ValueError(f"give {where('token')} or {where('token_file')}, not both")
    if token_file is not None:
        token = Path(str(token_file)).read_text().strip()
    tls_files = {k: scalars.pop(k) for k in list(scalars) if k.startswith("tls_")}
    tls: TLS | bool | None = bool(scalars.pop("tls", False)) or None
    if tls_files:
        tls = TLS(
            root_ca=_opt_str(tls_files.get("tls_root_ca")),
            cert=_opt_str(tls_files.get("tls_cert")),
            key=_opt_str(tls_files.get("tls_key")),
            server_name=_opt_str(tls_files.get("tls_server_name")),
        )
    out = PluginSettings(
        target=str(scalars.pop("target")),
        token=str(token) if token else None,
        tls=tls,
        quant=settings,
        **scalars,  # type: ignore[arg-type]
    )
    _check_ranges(out, where)
    return out


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _check_ranges(s: PluginSettings, where: Callable[[str], str]) -> None:
    check_prefix(s.key_prefix)
    limits = {
        "head_dim": (1, None),
        "timeout": (0.001, None),
        "timeout_per_mib": (0.0, None),
        "retries": (0, 10),
        "workers": (1, 64),
        "down_for": (0.0, None),
        "log_interval": (0.0, None),
    }
    for f in dataclasses.fields(s):
        if f.name not in limits:
            continue
        value = getattr(s, f.name)
        lo, hi = limits[f.name]
        if value is None:
            continue
        if value < lo or (hi is not None and value > hi):
            span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"{where(f.name)} must be {span}, got {value!r}")
