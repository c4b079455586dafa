"""The ``apikeys-server`` command: serve, migrate, admin-key."""

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from apikeys_server.app import App, build_services, create_server, upgrade_schema
from apikeys_server.config import MAX_PROCESSES, Settings
from apikeys_server.domain import scopes
from apikeys_server.domain.errors import DomainError
from apikeys_server.domain.validation import PLATFORM_TENANT
from apikeys_server.processes import Supervisor, WorkerLink, WorkersFailed
from apikeys_server.storage import migrate
from apikeys_server.storage.database import DatabaseTimeouts, open_database

ADMIN_SCOPES = (scopes.MANAGE, scopes.READ, scopes.VERIFY)
# What a command reports as one line and exit status 1 rather than a traceback.
EXPECTED_FAILURES = (DomainError, ValueError, OSError, SQLAlchemyError, ImportError)
log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apikeys-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def with_database(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--database-url", help="default: $APIKEYS_DATABASE_URL or sqlite:///apikeys.db"
        )

    serve = commands.add_parser("serve", help="run the gRPC server")
    with_database(serve)
    serve.add_argument("--listen", help="HOST:PORT, default: $APIKEYS_LISTEN or 127.0.0.1:50051")
    serve.add_argument("--key-prefix", help="default: $APIKEYS_KEY_PREFIX or 'ak'")
    serve.add_argument("--scopes", type=Path, help="scope catalog TOML file")
    serve.add_argument("--workers", type=int, help="RPC threads (default 16)")
    serve.add_argument(
        "--processes",
        type=int,
        help=f"server processes on the same address, 1..{MAX_PROCESSES} "
        "(default: $APIKEYS_PROCESSES or 1)",
    )

    migrate_cmd = commands.add_parser("migrate", help="bring the database schema up to date")
    with_database(migrate_cmd)

    admin = commands.add_parser(
        "admin-key", help="create a management key in the database; prints only the secret"
    )
    with_database(admin)
    admin.add_argument("--tenant", default=PLATFORM_TENANT, help="default: the platform tenant")
    admin.add_argument("--name", default="admin", help="default: admin")
    admin.add_argument("--key-prefix", help="default: $APIKEYS_KEY_PREFIX or 'ak'")
    admin.add_argument(
        "--scope",
        action="append",
        dest="grant",
        help=f"repeatable; default: {' '.join(ADMIN_SCOPES)}",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(
            os.environ,
            database_url=args.database_url,
            listen=getattr(args, "listen", None),
            key_prefix=getattr(args, "key_prefix", None),
            scopes_file=getattr(args, "scopes", None),
            workers=getattr(args, "workers", None),
            processes=getattr(args, "processes", None),
        )
    except ValueError as error:
        print(f"apikeys-server: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
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


def _serve_until(app: App, stopping: threading.Event, ready: Callable[[], None]) -> None:
    app.start()
    # Start-up objects (grpc, SQLAlchemy, protobuf, alembic: ~85 000) leave the collector's
    # reach, so full collections stop walking them on the Verify path (~10 µs a call, bench).
    gc.freeze()
    ready()
    stopping.wait()
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

    return Supervisor(settings.processes, work, settings.shutdown_grace_seconds).run()


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
