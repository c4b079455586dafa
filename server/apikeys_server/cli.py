"""The ``apikeys-server`` command: serve, migrate, admin-key, console."""

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import Field, fields, replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from apikeys_server import logs
from apikeys_server.app import App, build_services, create_server, upgrade_schema
from apikeys_server.config import (
    ConsoleSettings,
    Settings,
    describe,
    is_loopback,
    parse,
    rule_of,
)
from apikeys_server.domain import scopes
from apikeys_server.domain.errors import DomainError
from apikeys_server.domain.validation import PLATFORM_TENANT
from apikeys_server.processes import Supervisor, WorkerLink, WorkersFailed
from apikeys_server.storage import migrate
from apikeys_server.storage.database import DatabaseTimeouts, open_database
from apikeys_server.tls import TlsFiles, load

ADMIN_SCOPES = (scopes.MANAGE, scopes.READ, scopes.VERIFY)
# What a command reports as one line and exit status 1 rather than a traceback.
EXPECTED_FAILURES = (DomainError, ValueError, OSError, SQLAlchemyError, ImportError)
log = logging.getLogger(__name__)


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """The flags of these settings, parsed and described as config.py declares them."""
    for item in fields(Settings):
        flag = rule_of(item).flag
        if item.name in names and flag is not None:
            parser.add_argument(
                flag,
                dest=item.name,
                type=_flag_type(item, flag),
                metavar="FILE" if item.name.endswith("_file") else item.name.upper(),
                help=f"{rule_of(item).help} ({describe(item)})",
            )


def _flag_type(item: "Field[Any]", flag: str) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        try:
            return parse(item, raw, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _environment_only() -> str:
    lines = ["settings without a flag (environment variables):"]
    for item in fields(Settings):
        if rule_of(item).flag is None:
            lines.append(f"  {rule_of(item).help}: {describe(item)}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apikeys-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Flags override APIKEYS_* variables, which override the defaults.",
        epilog=_environment_only(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_setting_flags(serve, [item.name for item in fields(Settings)])

    migrate_cmd = commands.add_parser("migrate", help="bring the database schema up to date")
    _add_setting_flags(migrate_cmd, ["database_url"])

    admin = commands.add_parser(
        "admin-key", help="create a management key in the database; prints only the secret"
    )
    _add_setting_flags(admin, ["database_url", "key_prefix"])
    admin.add_argument("--tenant", default=PLATFORM_TENANT, help="default: the platform tenant")
    admin.add_argument("--name", default="admin", help="default: admin")
    admin.add_argument(
        "--scope",
        action="append",
        dest="grant",
        help=f"repeatable; default: {' '.join(ADMIN_SCOPES)}",
    )
    _add_console(commands)
    return parser


def _add_console(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``console``: its flags are the operator command's (``apikeys --target --tls…``) for the
    service it calls, with dests of their own so they never reach ``Settings``."""
    console = commands.add_parser(
        "console",
        help="serve the admin web console (a client of the gRPC service)",
        description="The admin web console. Flags override APIKEYS_CONSOLE_* variables "
        "(APIKEYS_CONSOLE_LISTEN, _TARGET, _TLS, _TLS_CA_FILE, _TLS_CERT_FILE, _TLS_KEY_FILE, "
        "_HTTPS_CERT_FILE, _HTTPS_KEY_FILE, _IDLE_MINUTES, _TIMEOUT_SECONDS).",
    )
    add = console.add_argument
    add("--listen", dest="console_listen", metavar="HOST:PORT", help="default 127.0.0.1:8080")
    add(
        "--target",
        dest="console_target",
        metavar="HOST:PORT",
        help="the service's host:port; default localhost:50051",
    )
    add("--tls", dest="console_tls", action="store_true", default=None, help="TLS, system roots")
    add("--tls-ca-file", dest="console_tls_ca_file", type=Path, metavar="FILE", help="CA(s)")
    add("--tls-cert-file", dest="console_tls_cert_file", type=Path, metavar="FILE", help="mTLS")
    add("--tls-key-file", dest="console_tls_key_file", type=Path, metavar="FILE", help="mTLS key")
    add("--https-cert-file", dest="console_https_cert_file", type=Path, metavar="FILE",
        help="serve the console over HTTPS (then its cookie is Secure)")  # fmt: skip
    add("--https-key-file", dest="console_https_key_file", type=Path, metavar="FILE")
    add("--idle-minutes", dest="console_idle_minutes", type=float, metavar="MINUTES",
        help="sign out after this idle time; default 15")  # fmt: skip
    add(
        "--timeout",
        dest="console_timeout_seconds",
        type=float,
        metavar="SECONDS",
        help="seconds per call",
    )


def _console_settings(args: argparse.Namespace) -> ConsoleSettings:
    prefix = "console_"
    flags = {
        name.removeprefix(prefix): value
        for name, value in vars(args).items()
        if name.startswith(prefix)
    }
    return ConsoleSettings.from_env(os.environ, **flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        flags = {item.name: getattr(args, item.name, None) for item in fields(Settings)}
        settings = Settings.from_env(os.environ, **flags)
        if args.command == "serve" and (files := TlsFiles.of(settings)) is not None:
            load(files)  # unusable files are bad settings too: one line, before anything starts
        console = _console_settings(args) if args.command == "console" else None
    except ValueError as error:
        print(f"apikeys-server: {error}", file=sys.stderr)
        return 2
    logs.configure(settings)
    try:
        if console is not None:
            return _console(console)
        if args.command == "serve":
            return _serve(settings)
        if args.command == "migrate":
            return _migrate(settings)
        return _admin_key(settings, args.tenant, args.name, args.grant or list(ADMIN_SCOPES))
    except (*EXPECTED_FAILURES, WorkersFailed) as error:
        print(f"apikeys-server: {_one_line(settings, error)}", file=sys.stderr)
        return 1


def _one_line(settings: Settings, error: Exception) -> str:
    if isinstance(error, SQLAlchemyError | ImportError):
        # Unreachable or unusable database (ImportError: a driver this package does not ship).
        return _database_problem(settings, error)
    return str(error)


def _database_problem(settings: Settings, error: Exception) -> str:
    """One line naming the database (password hidden) and the driver's own reason."""
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
    try:
        shown = make_url(settings.database_url).render_as_string(hide_password=True)
    except SQLAlchemyError:  # the URL itself did not parse; the reason says so
        shown = "the database"
    return f"cannot use {shown}: {reason}"


def _serve(settings: Settings) -> int:
    if not settings.tls and not is_loopback(settings.listen):
        log.warning(
            "serving plaintext on %s: keys cross the network readable; give --tls-cert-file "
            "and --tls-key-file (APIKEYS_TLS_CERT_FILE, APIKEYS_TLS_KEY_FILE)",
            settings.listen,
        )
    if settings.processes > 1:
        return _serve_processes(settings)
    app = create_server(settings)
    if not settings.migrate_on_start:
        # Migrating proved the database reachable; without it, check before reporting SERVING,
        # so a wrong address or a dead path fails the start instead of every later call.
        try:
            app.services.database.check_reachable()
        except BaseException:
            app.services.close()
            raise
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d; draining", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _serve_until(app, stopping, ready=lambda: None)
    return 0


SIGNAL_CHECK_SECONDS = 0.2


def _serve_until(app: App, stopping: threading.Event, ready: Callable[[], None]) -> None:
    app.start()
    # Start-up objects (grpc, SQLAlchemy, protobuf, alembic: ~85 000) leave the collector's
    # reach, so full collections stop walking them on the Verify path (~10 µs a call, bench).
    gc.freeze()
    ready()
    # Never an untimed wait: a signal delivered to another thread (the follower, the watchdog,
    # gRPC's) only sets a flag, and a main thread blocked on a lock without a timeout would not
    # run the handler until something else woke it (seen under load: SIGTERM ignored for 20 s).
    while not stopping.wait(SIGNAL_CHECK_SECONDS):
        pass
    app.stop()


def _serve_processes(settings: Settings) -> int:
    """Migrates once here, then forks the workers; none of them migrates again."""
    if settings.migrate_on_start:
        upgrade_schema(settings)
    worker_settings = replace(settings, migrate_on_start=False)

    def work(link: WorkerLink) -> int:
        def ready() -> None:
            link.ready()
            log.info("worker %d serving", os.getpid())

        try:
            _serve_until(create_server(worker_settings), link.stopping, ready)
        except EXPECTED_FAILURES as error:
            link.failed(_one_line(worker_settings, error))  # the parent logs it
            return 1
        return 0

    if not settings.metrics_listen:
        return Supervisor(settings.processes, work, settings.shutdown_grace_seconds).run()
    # The parent serves /metrics for every worker (metrics.py): set up before the first fork.
    from apikeys_server.metrics import ParentExporter

    exporter = ParentExporter(settings.metrics_listen)
    try:
        supervisor = Supervisor(
            settings.processes, work, settings.shutdown_grace_seconds, exporter.worker_exited
        )
        return supervisor.run()
    finally:
        exporter.close()


def _console(settings: ConsoleSettings) -> int:
    from apikeys_server import console  # its web stack is loaded only for this command

    return console.serve(settings)


def _migrate(settings: Settings) -> int:
    database = open_database(settings.database_url, timeouts=DatabaseTimeouts.of(settings))
    try:
        migrate.upgrade(database)
    finally:
        database.dispose()
    print("schema is up to date", file=sys.stderr)
    return 0


def _admin_key(settings: Settings, tenant: str, name: str, granted: list[str]) -> int:
    services = build_services(settings)
    try:
        issued = services.manager.create_unchecked(tenant, name, granted, expire_time=None)
    finally:
        services.close()
    print(f"created {issued.key.id} in tenant {tenant}", file=sys.stderr)
    print(issued.secret)
    return 0
