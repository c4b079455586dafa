"""Settings, read once at start-up from the environment and command-line flags.

Nothing else in the server reads ``os.environ``. Each field declares, next to itself, what it
may be (a range, allowed values or a shape) and its flag if it has one; one mechanism checks
every rule when Settings are built and ``serve --help`` is written from the same declarations.
"""

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from apikeys_server.domain.key_format import PREFIX_PATTERN

ENV_PREFIX = "APIKEYS_"
MAX_PROCESSES = 64
DAY = 86_400
BOOLEANS = {"true": True, "false": False, "1": True, "0": False}
BOOLEANS |= {"yes": True, "no": False, "on": True, "off": False}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
LOOPBACK_NAMES = ("localhost",)

_T = TypeVar("_T")


@dataclass(frozen=True)
class Rule:
    """What one setting may be: a number in [low, high] (timedelta: seconds), one of
    ``choices``, or whatever ``shape`` accepts (described by ``shape_text``)."""

    help: str = ""
    flag: str | None = None
    low: float | None = None
    high: float | None = None
    unit: str = ""
    choices: tuple[str, ...] = ()
    shape: Callable[[Any], bool] | None = None
    shape_text: str = ""

    def allowed(self) -> str:
        """The requirement, as errors and ``--help`` word it."""
        if self.low is not None and self.high is not None:
            unit = f" ({self.unit})" if self.unit else ""
            return f"between {_number(self.low)} and {_number(self.high)}{unit}"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return self.shape_text

    def accepts(self, value: Any) -> bool:
        if isinstance(value, timedelta):
            value = value.total_seconds()
        if self.low is not None and self.high is not None:
            # Written so that NaN fails too.
            return bool(self.low <= value <= self.high)
        if self.choices:
            return str(value).upper() in {choice.upper() for choice in self.choices}
        return self.shape is None or value is None or bool(self.shape(value))


def setting(default: _T, **rule: Any) -> _T:
    """A Settings field with its Rule; typed as its default so the dataclass stays plain."""
    made: Any = field(default=default, metadata={"rule": Rule(**rule)})
    return made  # type: ignore[no-any-return]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def host_port(listen: str) -> tuple[str, str] | None:
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.removeprefix("[").removesuffix("]"), port


def is_loopback(listen: str) -> bool:
    """Whether ``listen`` only accepts connections from this host."""
    parts = host_port(listen)
    if parts is None:
        return listen.startswith("unix:")
    host = parts[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_BOOLEAN = {"choices": tuple(BOOLEANS)}
_SECONDS = {"unit": "seconds"}


@dataclass(frozen=True)
class Settings:
    database_url: str = setting(
        "sqlite:///apikeys.db",
        flag="--database-url",
        help="SQLite file or postgresql://user@host/db",
        shape=bool,
        shape_text="a database URL",
    )
    listen: str = setting(
        "127.0.0.1:50051",
        flag="--listen",
        help="gRPC address",
        shape=lambda value: host_port(value) is not None or value.startswith("unix:"),
        shape_text="HOST:PORT with a port 0..65535",
    )
    # Per deployment, so keys of different environments never verify on each other.
    key_prefix: str = setting(
        "ak",
        flag="--key-prefix",
        help="per-deployment key prefix, e.g. wc_live",
        shape=PREFIX_PATTERN.fullmatch,
        shape_text="lowercase letters and digits, optionally one '_' (e.g. wc_live)",
    )
    scopes_file: Path | None = setting(
        None, flag="--scopes", help="scope catalog TOML file", shape_text="a TOML file"
    )
    workers: int = setting(16, flag="--workers", help="RPC threads", low=1, high=1024)
    # Server processes on one address (SO_REUSEPORT), each with `workers` threads: see README.
    processes: int = setting(
        1, flag="--processes", help="server processes on the address", low=1, high=MAX_PROCESSES
    )
    # Limits that hold under abuse and overload (rpc/dispatch.py, app.make_grpc_server): a
    # call reaches a worker only once its request is complete; a complete one is refused
    # (RESOURCE_EXHAUSTED) rather than queued past its deadline or past max_queued_calls.
    max_queued_calls: int = setting(
        256, help="complete calls waiting for a worker before more are refused", low=1, high=100_000
    )
    max_streams: int = setting(
        64,
        help="open streams (watches, reflection) at once, on threads of their own",
        low=1,
        high=10_000,
    )
    max_request_bytes: int = setting(
        65_536, help="largest request message", low=1024, high=64 * 1024 * 1024, unit="bytes"
    )
    # gRPC's core counts a stream until its polling thread has handled the call's last
    # events, which under overload trails the answers: at 100, a client with 64 calls in
    # flight on a connection saw REFUSED_STREAM resets (bench --smoke, cache misses).
    max_streams_per_connection: int = setting(
        1000, help="concurrent HTTP/2 streams a connection may open", low=1, high=100_000
    )
    # The server pings idle connections to find dead peers; clients may ping it no more often
    # than min_client_ping_seconds (the Python client pings every 30 s), else they are cut off.
    keepalive_seconds: float = setting(
        60.0,
        help="ping a connection after this long without activity",
        low=1,
        high=DAY,
        **_SECONDS,
    )
    keepalive_timeout_seconds: float = setting(
        20.0,
        help="close a connection whose ping is unanswered this long",
        low=1,
        high=3600,
        **_SECONDS,
    )
    min_client_ping_seconds: float = setting(
        20.0,
        help="shortest interval between a client's keepalive pings",
        low=1,
        high=DAY,
        **_SECONDS,
    )
    # Server TLS (with both files), and client certificates required when a CA is given.
    # Files are re-read when they change (tls.py).
    tls_cert_file: Path | None = setting(
        None,
        flag="--tls-cert-file",
        help="server certificate chain (PEM); with --tls-key-file: TLS",
        shape_text="a PEM file",
    )
    tls_key_file: Path | None = setting(
        None, flag="--tls-key-file", help="server private key (PEM)", shape_text="a PEM file"
    )
    tls_client_ca_file: Path | None = setting(
        None,
        flag="--tls-client-ca-file",
        help="CA certificates (PEM) that client certificates must chain to; requires them",
        shape_text="a PEM file",
    )
    # Changes are evicted at once, here and (through the change feed) in every other process:
    # the TTL is only a backstop.
    cache_size: int = setting(100_000, help="cached keys (0: no cache)", low=0, high=10_000_000)
    cache_ttl_seconds: float = setting(
        300.0, help="cached key lifetime", low=0, high=DAY, **_SECONDS
    )
    negative_cache_size: int = setting(100_000, help="cached unknown keys", low=0, high=10_000_000)
    negative_cache_ttl_seconds: float = setting(
        30.0, help="cached unknown key lifetime", low=0, high=DAY, **_SECONDS
    )
    last_used_flush_seconds: float = setting(
        5.0, help="last-used batch interval", low=0.01, high=DAY, **_SECONDS
    )
    # The change feed: read at least this often (PostgreSQL also wakes on NOTIFY); a cached
    # answer is served only if the feed was confirmed read to its end within max_staleness.
    follow_feed: bool = setting(True, help="follow the change feed", **_BOOLEAN)
    feed_poll_seconds: float = setting(
        0.25, help="change feed read interval", low=0.01, high=60, **_SECONDS
    )
    max_staleness_seconds: float = setting(
        10.0, help="cached answers need the feed read within this", low=0.1, high=3600, **_SECONDS
    )
    feed_retention: timedelta = setting(
        timedelta(days=7), help="change feed retention", low=60, high=365 * DAY, **_SECONDS
    )
    max_rotation_overlap: timedelta = setting(
        timedelta(days=30), help="longest rotation overlap", low=0, high=365 * DAY, **_SECONDS
    )
    shutdown_grace_seconds: float = setting(
        10.0, help="SIGTERM drains in-flight calls this long", low=0, high=3600, **_SECONDS
    )
    migrate_on_start: bool = setting(True, help="serve migrates the schema first", **_BOOLEAN)
    log_level: str = setting("INFO", help="log level", choices=LOG_LEVELS)
    log_format: str = setting(
        "text", flag="--log-format", help="log lines: text or JSON objects", choices=LOG_FORMATS
    )
    # Prometheus text at http://HOST:PORT/metrics (metrics.py); empty: no metrics endpoint.
    metrics_listen: str = setting(
        "",
        flag="--metrics-listen",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (empty: off)",
        shape=lambda value: value == "" or host_port(value) is not None,
        shape_text="HOST:PORT with a port 0..65535, or empty",
    )
    # Bounds on each database operation, so a lost or silent database answers UNAVAILABLE
    # quickly instead of holding calls (and shutdown) for minutes. See storage/database.py.
    # Zero would mean no bound at all in libpq.
    db_connect_timeout_seconds: float = setting(
        2.0, help="PostgreSQL connect bound", low=0.01, high=600, **_SECONDS
    )
    db_read_timeout_seconds: float = setting(
        2.0, help="database read bound", low=0.01, high=600, **_SECONDS
    )
    db_write_timeout_seconds: float = setting(
        5.0, help="database write bound", low=0.01, high=600, **_SECONDS
    )
    db_pool_timeout_seconds: float = setting(
        1.0, help="wait for a pooled connection", low=0.01, high=600, **_SECONDS
    )
    db_watchdog: bool = setting(True, help="enforce the database bounds", **_BOOLEAN)
    # Envoy ext_authz (rpc/ext_authz.py): the HTTP header holding the presented key, and whether
    # the upstream still gets it (by default Envoy removes it once checked).
    ext_authz_key_header: str = setting(
        "x-api-key",
        help="HTTP header holding the key Envoy's Check presents",
        shape=lambda value: re.fullmatch(r"[a-z0-9-]{1,64}", value) is not None,
        shape_text="a lowercase HTTP header name",
    )
    ext_authz_keep_key_header: bool = setting(
        False, help="let the upstream see the key header after Check", **_BOOLEAN
    )

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not rule_of(item).accepts(value):
                raise InvalidSetting(item.name, value, rule_of(item).allowed())
        _check_together(self)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> "Settings":
        """Defaults, then APIKEYS_* variables, then explicit overrides (flags); None is skipped."""
        values: dict[str, Any] = {}
        shown: dict[str, str] = {}
        for item in fields(cls):
            variable = variable_of(item.name)
            raw = environ.get(variable)
            if raw is not None and raw != "":
                values[item.name] = parse(item, raw, variable)
                shown[item.name] = f"{variable}={raw}"
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
                flag = _field(name).metadata.get("rule", Rule()).flag if _known(name) else None
                shown[name] = f"{flag} {value}" if flag else f"{variable_of(name)}={value}"
        try:
            return replace(cls(), **values)
        except InvalidSetting as error:
            raise error.as_given(shown.get(error.name)) from None


class InvalidSetting(ValueError):
    """A setting outside what its Rule allows; the message is one line naming it."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.requirement = name, value, allowed
        super().__init__(f"{_both(name, f'={_shown(value)}')} must be {allowed}")

    def as_given(self, given: str | None) -> "InvalidSetting":
        """The same error worded with what the user wrote (``APIKEYS_X=-1`` or ``--flag -1``)."""
        if given is None:
            return self
        other = _other_name(self.name, given)
        again = InvalidSetting(self.name, self.value, self.requirement)
        again.args = (f"{given}{other} must be {self.requirement}",)
        return again


class SettingsConflict(ValueError):
    """Settings that are each allowed but not together."""


def variable_of(name: str) -> str:
    return ENV_PREFIX + name.upper()


def rule_of(item: "Field[Any]") -> Rule:
    rule = item.metadata.get("rule")
    return rule if isinstance(rule, Rule) else Rule()


def _known(name: str) -> bool:
    return any(item.name == name for item in fields(Settings))


def _field(name: str) -> "Field[Any]":
    return next(item for item in fields(Settings) if item.name == name)


def _shown(value: Any) -> str:
    if isinstance(value, timedelta):
        return _number(value.total_seconds())
    if isinstance(value, float):
        return _number(value)
    return str(value)


def _both(name: str, value_text: str) -> str:
    """``APIKEYS_X=value``, with `` (or --x)`` when it has a flag too."""
    flag = rule_of(_field(name)).flag
    return f"{variable_of(name)}{value_text}" + (f" (or {flag})" if flag else "")


def _other_name(name: str, given: str) -> str:
    flag = rule_of(_field(name)).flag
    if flag is None:
        return ""
    return f" (or {variable_of(name)})" if given.startswith(flag) else f" (or {flag})"


def named(name: str) -> str:
    """``--flag / APIKEYS_VARIABLE``, or the variable alone."""
    flag = rule_of(_field(name)).flag
    return f"{flag} / {variable_of(name)}" if flag else variable_of(name)


def _check_together(settings: Settings) -> None:
    """The rules that involve more than one setting."""
    if settings.processes > 1 and settings.listen.rsplit(":", 1)[-1] == "0":
        raise SettingsConflict(
            f"--listen {settings.listen} needs --processes 1: with port 0 each of the "
            f"{settings.processes} processes would listen on a different port"
        )
    if settings.processes > 1 and settings.metrics_listen.rsplit(":", 1)[-1] == "0":
        raise SettingsConflict(
            f"--metrics-listen {settings.metrics_listen} needs a fixed port with --processes "
            f"{settings.processes}: scrapers must find the endpoint"
        )
    if settings.feed_poll_seconds >= settings.max_staleness_seconds:
        raise SettingsConflict(
            f"{named('feed_poll_seconds')} ({_shown(settings.feed_poll_seconds)}) must be "
            f"smaller than {named('max_staleness_seconds')} "
            f"({_shown(settings.max_staleness_seconds)}): otherwise the cache is never trusted"
        )
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise SettingsConflict(
            f"{named('tls_cert_file')} and {named('tls_key_file')} go together: "
            "give both or neither"
        )
    if settings.tls_client_ca_file is not None and settings.tls_cert_file is None:
        raise SettingsConflict(
            f"{named('tls_client_ca_file')} needs {named('tls_cert_file')} and "
            f"{named('tls_key_file')}: client certificates are only checked over TLS"
        )


def parse(item: "Field[Any]", raw: str, given_as: str) -> Any:
    """The value of ``raw`` for the field (not yet range-checked); ValueError naming
    ``given_as`` (the variable or the flag) when it is not of the field's kind."""
    kind = item.type
    given = f"{given_as} {raw!r}" if given_as.startswith("-") else f"{given_as}={raw!r}"
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            return BOOLEANS[raw.strip().lower()]
        if kind in (timedelta, "timedelta"):
            return timedelta(seconds=float(raw))
        if kind == Path | None:
            return Path(raw)
        return raw
    except (ValueError, KeyError, OverflowError):
        if kind in (bool, "bool"):
            raise ValueError(f"{given} must be one of {', '.join(BOOLEANS)}") from None
        raise ValueError(f"{given} is not a valid value") from None


def describe(item: "Field[Any]") -> str:
    """``$VARIABLE, default D, allowed``: what ``--help`` says of one setting."""
    rule = rule_of(item)
    default = item.default
    if isinstance(default, bool):
        default_text = "true" if default else "false"
    elif default is None:
        default_text = "none"
    else:
        default_text = _shown(default)
    allowed = rule.allowed()
    return f"${variable_of(item.name)}; default {default_text}" + (
        f"; {allowed}" if allowed else ""
    )


CONSOLE_PREFIX = "APIKEYS_CONSOLE_"


@dataclass(frozen=True)
class ConsoleSettings:
    """``apikeys-server console``: the admin web console, a client of the gRPC service.

    Read from ``APIKEYS_CONSOLE_<FIELD>`` variables, then flags (``cli.py``). The gRPC-side TLS
    options mean what the operator command's do (``apikeys --tls …``).
    """

    listen: str = "127.0.0.1:8080"
    target: str = "localhost:50051"
    tls: bool = False  # TLS to the service with the system's roots
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None  # client certificate (mTLS), with tls_key_file
    tls_key_file: Path | None = None
    # The console's own HTTPS (then its session cookie is Secure).
    https_cert_file: Path | None = None
    https_key_file: Path | None = None
    idle_minutes: float = 15.0
    timeout_seconds: float = 10.0

    def __post_init__(self) -> None:
        if host_port(self.listen) is None:
            raise ValueError(
                f"console --listen {self.listen!r} must be HOST:PORT with a port 0..65535"
            )
        if not self.target:
            raise ValueError("console --target must name the service's host:port")
        if not 1 <= self.idle_minutes <= 24 * 60:
            raise ValueError(f"console --idle-minutes {self.idle_minutes} must be 1..1440")
        if not 0.1 <= self.timeout_seconds <= 300:
            raise ValueError(f"console --timeout {self.timeout_seconds} must be 0.1..300")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise SettingsConflict("--tls-cert-file and --tls-key-file go together")
        if (self.https_cert_file is None) != (self.https_key_file is None):
            raise SettingsConflict("--https-cert-file and --https-key-file go together")

    @property
    def grpc_tls(self) -> bool:
        """Whether the service is reached over TLS (any TLS option given)."""
        return self.tls or any((self.tls_ca_file, self.tls_cert_file, self.tls_key_file))

    @property
    def https(self) -> bool:
        return self.https_cert_file is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> "ConsoleSettings":
        """Defaults, then APIKEYS_CONSOLE_* variables, then overrides (flags; None skipped)."""
        values: dict[str, Any] = {}
        for item in fields(cls):
            variable = CONSOLE_PREFIX + item.name.upper()
            raw = environ.get(variable)
            if raw:
                values[item.name] = parse(item, raw, variable)
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)
