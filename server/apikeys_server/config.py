"""Settings, read once at start-up from the environment and command-line flags.

Nothing else in the server reads ``os.environ``.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

ENV_PREFIX = "APIKEYS_"
MAX_PROCESSES = 64


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///apikeys.db"
    listen: str = "127.0.0.1:50051"
    # Per deployment, so keys of different environments never verify on each other.
    key_prefix: str = "ak"
    scopes_file: Path | None = None
    workers: int = 16
    # Server processes on one address (SO_REUSEPORT), each with `workers` threads: see README.
    processes: int = 1
    # Changes are evicted at once, here and (through the change feed) in every other process:
    # the TTL is only a backstop.
    cache_size: int = 100_000
    cache_ttl_seconds: float = 300.0
    negative_cache_size: int = 100_000
    negative_cache_ttl_seconds: float = 30.0
    last_used_flush_seconds: float = 5.0
    # The change feed: read at least this often (PostgreSQL also wakes on NOTIFY); a cached
    # answer is served only if the feed was confirmed read to its end within max_staleness.
    follow_feed: bool = True
    feed_poll_seconds: float = 0.25
    max_staleness_seconds: float = 10.0
    feed_retention: timedelta = field(default=timedelta(days=7))
    max_rotation_overlap: timedelta = field(default=timedelta(days=30))
    shutdown_grace_seconds: float = 10.0
    migrate_on_start: bool = True
    log_level: str = "INFO"
    # Bounds on each database operation, so a lost or silent database answers UNAVAILABLE
    # quickly instead of holding calls (and shutdown) for minutes. See storage/database.py.
    db_connect_timeout_seconds: float = 2.0
    db_read_timeout_seconds: float = 2.0
    db_write_timeout_seconds: float = 5.0
    db_pool_timeout_seconds: float = 1.0
    db_watchdog: bool = True
    # Envoy ext_authz (rpc/ext_authz.py): the HTTP header holding the presented key, and whether
    # the upstream still gets it (by default Envoy removes it once checked).
    ext_authz_key_header: str = "x-api-key"
    ext_authz_keep_key_header: bool = False

    def __post_init__(self) -> None:
        for name in _POSITIVE_SECONDS:
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}={value!r} must be positive seconds")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> "Settings":
        """Defaults, then APIKEYS_* variables, then explicit overrides (flags); None is skipped."""
        values: dict[str, Any] = {}
        for item in fields(cls):
            raw = environ.get(ENV_PREFIX + item.name.upper())
            if raw is not None and raw != "":
                values[item.name] = _parse(item.name, item.type, raw)
        values.update({name: value for name, value in overrides.items() if value is not None})
        settings = replace(cls(), **values)
        _check_processes(settings)
        return settings


def _check_processes(settings: Settings) -> None:
    if not 1 <= settings.processes <= MAX_PROCESSES:
        raise ValueError(
            f"--processes / {ENV_PREFIX}PROCESSES must be between 1 and {MAX_PROCESSES}, "
            f"not {settings.processes}"
        )
    if settings.processes > 1 and settings.listen.rsplit(":", 1)[-1] == "0":
        raise ValueError(
            f"--listen {settings.listen} needs --processes 1: with port 0 each of the "
            f"{settings.processes} processes would listen on a different port"
        )


_POSITIVE_SECONDS = (
    "db_connect_timeout_seconds",
    "db_read_timeout_seconds",
    "db_write_timeout_seconds",
    "db_pool_timeout_seconds",
)


def _parse(name: str, kind: Any, raw: str) -> Any:
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if kind in (timedelta, "timedelta"):
            return timedelta(seconds=float(raw))
        if name == "scopes_file":
            return Path(raw)
        return raw
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid value") from None
