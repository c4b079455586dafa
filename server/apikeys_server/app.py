"""Wiring: build the layers from Settings and start a gRPC server on them."""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from apikeys.v1 import key_manager_pb2, key_verifier_pb2
from apikeys_server.config import Settings
from apikeys_server.domain.clock import Clock, SystemClock
from apikeys_server.domain.key_format import KeyFormat
from apikeys_server.domain.manager import KeyManager
from apikeys_server.domain.ports import ChangeSource
from apikeys_server.domain.scopes import load_catalog
from apikeys_server.domain.verifier import Verifier
from apikeys_server.logs import REFUSED_CALLERS
from apikeys_server.rpc import dispatch, ext_authz
from apikeys_server.rpc.key_manager import KeyManagerServicer
from apikeys_server.rpc.key_verifier import KeyVerifierServicer
from apikeys_server.rpc.reflection import enable_reflection
from apikeys_server.rpc.registration import add_servicer, observed
from apikeys_server.storage import migrate
from apikeys_server.storage.cache import CachedKeyLookup, KeyCache
from apikeys_server.storage.database import Database, DatabaseTimeouts, open_database
from apikeys_server.storage.feed import SqlChangeFeed
from apikeys_server.storage.follower import FeedFollower, NotFollowing
from apikeys_server.storage.last_used import LastUsedRecorder
from apikeys_server.storage.listener import FeedListener, conninfo
from apikeys_server.storage.repository import SqlKeyStore
from apikeys_server.tls import ReloadingCertificates, TlsFiles

if TYPE_CHECKING:
    from apikeys_server.metrics import Metrics

log = logging.getLogger(__name__)

KEY_MANAGER = key_manager_pb2.DESCRIPTOR.services_by_name["KeyManager"]
KEY_VERIFIER = key_verifier_pb2.DESCRIPTOR.services_by_name["KeyVerifier"]
SERVICE_NAMES = (KEY_MANAGER.full_name, KEY_VERIFIER.full_name, ext_authz.SERVICE_NAME)


@dataclass(frozen=True)
class Services:
    """The domain services over one database, with the cache and last-used recorder they share."""

    settings: Settings
    database: Database
    store: SqlKeyStore
    cache: KeyCache
    last_used: LastUsedRecorder
    follower: FeedFollower | None
    verifier: Verifier
    manager: KeyManager

    @property
    def changes(self) -> ChangeSource:
        return self.follower if self.follower is not None else NotFollowing()

    def start(self) -> None:
        """Starts the background parts: the feed follower (first: it must reach the database
        before anything is served) and the last-used flusher."""
        if self.follower is not None:
            self.follower.start()
        self.last_used.start()

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.last_used.stop()
        self.database.dispose()


# Spare connections per engine for a process among several, beyond one per RPC thread: each
# repository call holds at most one connection of an engine, and besides the RPC threads only
# the feed follower (reads the feed, prunes it) and the last-used flusher (writes) use them.
# A single process keeps its historical overflow (workers).
SHARED_HOST_OVERFLOW = 2


def pool_overflow(settings: Settings) -> int:
    return settings.workers if settings.processes == 1 else SHARED_HOST_OVERFLOW


def upgrade_schema(settings: Settings) -> None:
    """Migrations once, before any server exists; its connections are closed on return."""
    database = open_database(
        settings.database_url, pool_size=1, timeouts=DatabaseTimeouts.of(settings)
    )
    try:
        migrate.upgrade(database)
    finally:
        database.dispose()


def _follower(
    settings: Settings,
    database: Database,
    cache: KeyCache,
    clock: Clock,
    on_health: Callable[[bool], None],
) -> FeedFollower | None:
    if not settings.follow_feed:
        log.warning(
            "not following the change feed (APIKEYS_FOLLOW_FEED=false): changes made by other "
            "processes are seen only when cached entries expire (APIKEYS_CACHE_TTL_SECONDS)"
        )
        return None
    wake = threading.Event()
    listener = (
        None
        if database.is_sqlite
        else FeedListener(conninfo(database.url), wake, settings.db_connect_timeout_seconds)
    )
    return FeedFollower(
        SqlChangeFeed(database),
        cache,
        clock,
        poll_seconds=settings.feed_poll_seconds,
        max_staleness=settings.max_staleness_seconds,
        retention=settings.feed_retention,
        wake=wake,
        listener=listener,
        on_health=on_health,
    )


def _evict_from(cache: KeyCache) -> Callable[[list[bytes], list[int]], None]:
    def evict(digests: list[bytes], _positions: list[int]) -> None:
        for digest in digests:
            cache.evict(digest)

    return evict


def build_services(
    settings: Settings,
    clock: Clock | None = None,
    on_health: Callable[[bool], None] = lambda serving: None,
) -> Services:
    clock = clock or SystemClock()
    database = open_database(
        settings.database_url,
        settings.workers,
        DatabaseTimeouts.of(settings),
        max_overflow=pool_overflow(settings),
    )
    if settings.migrate_on_start:
        migrate.upgrade(database)
    cache = KeyCache(
        settings.cache_size,
        settings.cache_ttl_seconds,
        settings.negative_cache_size,
        settings.negative_cache_ttl_seconds,
    )
    follower = _follower(settings, database, cache, clock, on_health)
    store = SqlKeyStore(
        database, follower.committed_here if follower is not None else _evict_from(cache)
    )
    key_format = KeyFormat(settings.key_prefix)
    catalog = load_catalog(settings.scopes_file)
    last_used = LastUsedRecorder(store, settings.last_used_flush_seconds)
    verifier = Verifier(
        key_format, CachedKeyLookup(store, cache), catalog, clock, last_used, tripwire=last_used
    )
    manager = KeyManager(store, catalog, key_format, clock, settings.max_rotation_overlap)
    return Services(settings, database, store, cache, last_used, follower, verifier, manager)


def make_grpc_server(settings: Settings, pool: dispatch.Dispatcher | None = None) -> grpc.Server:
    """The gRPC server every App runs on; the benchmark's echo ceiling is built with it too.

    Calls reach the ``workers`` threads only once their request is complete, and the excess
    is refused instead of queued (rpc/dispatch.py); requests, streams per connection and
    keepalive pings are bounded by the settings. Several processes share one port through
    SO_REUSEPORT (the kernel spreads connections); a single process leaves it off, so a port
    another server holds fails loudly at start.
    """
    dispatch.install()
    return grpc.server(pool or dispatcher(settings), options=server_options(settings))


def dispatcher(settings: Settings) -> dispatch.Dispatcher:
    return dispatch.Dispatcher(settings.workers, settings.max_queued_calls, settings.max_streams)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 1 if settings.processes > 1 else 0),
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.min_client_ping_seconds)),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class App:
    """A bound, not yet started, server. ``port`` is the real port (useful with ``:0``)."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.health = health.HealthServicer()
        self.services = build_services(settings, self.clock, self._set_health)
        self.dispatcher = dispatcher(settings)
        self.metrics = _metrics(settings, self.services, self.dispatcher)
        self.server = make_grpc_server(settings, self.dispatcher)
        # Not the generated add_*_to_server: undecodable requests answer INVALID_ARGUMENT.
        add_servicer(
            self.server,
            KEY_MANAGER,
            KeyManagerServicer(self.services.manager, self.services.verifier, self.clock),
            self.metrics,
        )
        add_servicer(
            self.server,
            KEY_VERIFIER,
            KeyVerifierServicer(
                self.services.verifier,
                self.services.changes,
                max(1, settings.max_streams * 3 // 4),  # the rest for health and reflection
                self.metrics.count_verify if self.metrics is not None else None,
            ),
            self.metrics,
        )
        authz = ext_authz.ExtAuthzServicer(
            self.services.verifier,
            settings.ext_authz_key_header,
            settings.ext_authz_keep_key_header,
        )
        if self.metrics is not None:
            # Registered by its generated code (not add_servicer): observed here instead.
            observe = self.metrics.observer(ext_authz.SERVICE_NAME, "Check", "unary")
            setattr(authz, "Check", observed(authz.Check, observe, streaming=False))  # noqa: B010
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authz, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), self.server)
        try:
            self.port = self._listen(settings)
        except RuntimeError as error:
            self.services.close()
            raise OSError(f"cannot listen on {settings.listen}: {error}") from error
        except BaseException:
            self.services.close()
            raise

    def _listen(self, settings: Settings) -> int:
        """Plaintext, or TLS whose files are re-read when they change (built here, after any
        fork: gRPC objects do not survive one)."""
        files = TlsFiles.of(settings)
        if files is None:
            return self.server.add_insecure_port(settings.listen)
        credentials = ReloadingCertificates(files).server_credentials()
        return self.server.add_secure_port(settings.listen, credentials)

    def start(self) -> None:
        self.services.start()
        if self.metrics is not None:
            self.metrics.start()
        self.server.start()
        follower = self.services.follower
        self._set_health(follower.serving if follower is not None else True)
        log.info(
            "apikeys server listening on %s (port %d, %s)",
            self.settings.listen,
            self.port,
            _transport(self.settings),
        )

    def stop(self, grace: float | None = None) -> None:
        """Stops taking calls, lets in-flight ones finish, flushes last-used times."""
        if self.services.follower is not None:
            self.services.follower.end_watches()  # streams would hold the drain to its end
        self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self.server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.stop()
        self.services.close()
        REFUSED_CALLERS.flush()
        log.info("apikeys server stopped")

    def _set_health(self, serving: bool) -> None:
        """SERVING while this process can answer Verify correctly (see the change feed)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)


def _metrics(settings: Settings, services: Services, pool: dispatch.Dispatcher) -> "Metrics | None":
    """The App's metrics when ``--metrics-listen`` is set (imported only then: with several
    processes the parent must set prometheus-client's directory up before it is first used)."""
    if not settings.metrics_listen:
        return None
    from apikeys_server import metrics

    made = metrics.Metrics(settings)
    made.watch(
        metrics.figures(
            services.cache, services.database, services.last_used, services.follower, pool
        )
    )
    return made


def _transport(settings: Settings) -> str:
    if not settings.tls:
        return "plaintext"
    return "TLS, client certificates required" if settings.tls_client_ca_file else "TLS"


def create_server(settings: Settings, clock: Clock | None = None) -> App:
    return App(settings, clock)
