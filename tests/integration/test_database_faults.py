"""PostgreSQL behind a real network fault (bench/tcp_proxy.py): silence, then a stopped database.

Every call must end within its bound with UNAVAILABLE (never UNKNOWN or INTERNAL, never a hang),
cached keys keep verifying, and the first call after the path returns succeeds.
"""

import hashlib
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from apikeys_client import AlreadyGone, ApiKeysClient, Unavailable
from apikeys_server.domain import errors
from apikeys_server.storage.database import DatabaseTimeouts, open_database
from apikeys_server.storage.repository import SqlKeyStore
from bench.tcp_proxy import TcpProxy
from tests.faults import proxy_to, through, timed
from tests.support import RunningServer, running_server, server_settings

pytestmark = pytest.mark.postgres

READ_BOUND = 2.0
WRITE_BOUND = 2.0
SLACK = 0.5  # the watchdog's tick, thread scheduling, a busy two-core test machine
RECOVERY = 2.0
SCOPES = ["passes:read"]


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[TcpProxy]:
    engine = create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE api_keys, key_events"))
    engine.dispose()
    proxy = proxy_to(postgres_url)
    yield proxy
    proxy.stop()


def _serve(proxy: TcpProxy, postgres_url: str, **overrides: object) -> Iterator[RunningServer]:
    settings = server_settings(
        through(proxy, postgres_url),
        **{
            "migrate_on_start": False,  # the session's database is migrated already
            "cache_ttl_seconds": 3600.0,  # keys verified before the fault stay cached through it
            "db_read_timeout_seconds": READ_BOUND,
            "db_write_timeout_seconds": WRITE_BOUND,
            **overrides,
        },
    )
    with running_server(settings) as server:
        yield server
        # Closing the path first frees any handler still blocked on it (the negative control).
        proxy.stop()


@pytest.fixture
def server(proxy: TcpProxy, postgres_url: str) -> Iterator[RunningServer]:
    yield from _serve(proxy, postgres_url)


@pytest.fixture
def unwatched_server(proxy: TcpProxy, postgres_url: str) -> Iterator[RunningServer]:
    # Nothing else may use the pool: the lookup under test must get an established connection
    # (a new one would end at the connect timeout instead), so no feed follower either.
    yield from _serve(proxy, postgres_url, db_watchdog=False, follow_feed=False)


def _prepare(client: ApiKeysClient) -> tuple[str, str, str]:
    """(a verified, hence cached, secret; its key id; a secret only the database knows)."""
    cached = client.create_key("cached", SCOPES, tenant_id="acme")
    assert client.verify(cached.secret, SCOPES, tenant_id="acme").valid  # also caches the caller
    uncached = client.create_key("uncached", SCOPES, tenant_id="acme")  # never verified
    return cached.secret, cached.key.id, uncached.secret


def _health(server: RunningServer) -> int:
    with server.channel() as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=1
        )
    return int(answer.status)


class TestBlackhole:
    def test_calls_answer_unavailable_within_their_bound_then_recover(
        self, server: RunningServer, proxy: TcpProxy
    ) -> None:
        """Silence: uncached Verify and changes answer UNAVAILABLE in time, cached keys and
        health still answer, and the first Verify after the path returns succeeds."""
        client = server.client()
        cached, cached_id, uncached = _prepare(client)
        proxy.blackhole()

        outcome, seconds = timed(lambda: client.verify(uncached, SCOPES, tenant_id="acme"))
        assert isinstance(outcome, Unavailable), outcome
        assert seconds <= READ_BOUND + SLACK, f"uncached Verify took {seconds:.2f} s"

        outcome, seconds = timed(lambda: client.create_key("new", SCOPES, tenant_id="acme"))
        assert isinstance(outcome, Unavailable), outcome
        assert seconds <= WRITE_BOUND + SLACK, f"CreateKey took {seconds:.2f} s"

        outcome, seconds = timed(lambda: client.revoke_key(cached_id, tenant_id="acme"))
        assert isinstance(outcome, Unavailable), outcome
        assert seconds <= WRITE_BOUND + SLACK, f"RevokeKey took {seconds:.2f} s"

        outcome, seconds = timed(lambda: client.verify(cached, SCOPES, tenant_id="acme"))
        assert not isinstance(outcome, Exception) and outcome.valid, outcome
        assert seconds <= SLACK
        assert _health(server) == health_pb2.HealthCheckResponse.SERVING

        proxy.resume()
        outcome, seconds = timed(lambda: client.verify(uncached, SCOPES, tenant_id="acme"))
        assert not isinstance(outcome, Exception) and outcome.valid, outcome
        assert seconds <= RECOVERY, f"first Verify after the path returned took {seconds:.2f} s"

    def test_without_the_watchdog_an_uncached_verify_hangs(
        self, unwatched_server: RunningServer, proxy: TcpProxy
    ) -> None:
        """Negative control: connect and statement timeouts alone do not bound a call behind
        silence (the server never sees the statement); the client's deadline ends it."""
        _, _, uncached = _prepare(unwatched_server.client())
        proxy.blackhole()
        with ApiKeysClient(unwatched_server.target, unwatched_server.admin_key, timeout=4) as late:
            outcome, seconds = timed(lambda: late.verify(uncached, SCOPES, tenant_id="acme"))
        assert isinstance(outcome, AlreadyGone), outcome
        assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert seconds > READ_BOUND + SLACK


class TestStoppedDatabase:
    def test_refused_connections_answer_unavailable_fast_then_recover(
        self, server: RunningServer, proxy: TcpProxy
    ) -> None:
        """The database stops (connections closed, new ones refused): UNAVAILABLE at once;
        once it is back, the stale pooled connections are replaced within the first call."""
        client = server.client()
        cached, _, uncached = _prepare(client)
        proxy.refuse()

        outcome, seconds = timed(lambda: client.verify(uncached, SCOPES, tenant_id="acme"))
        assert isinstance(outcome, Unavailable), outcome
        assert seconds <= SLACK, f"uncached Verify took {seconds:.2f} s"
        outcome, seconds = timed(lambda: client.create_key("new", SCOPES, tenant_id="acme"))
        assert isinstance(outcome, Unavailable), outcome
        assert seconds <= SLACK
        assert client.verify(cached, SCOPES, tenant_id="acme").valid

        proxy.resume()
        outcome, seconds = timed(lambda: client.verify(uncached, SCOPES, tenant_id="acme"))
        assert not isinstance(outcome, Exception) and outcome.valid, outcome
        assert seconds <= RECOVERY


class TestDigestLookup:
    """The Verify fast path on its own: retried once for a stale connection, never for a bound."""

    @pytest.fixture
    def store(self, proxy: TcpProxy, postgres_url: str) -> Iterator[SqlKeyStore]:
        timeouts = DatabaseTimeouts(read=1.0)
        database = open_database(through(proxy, postgres_url), pool_size=1, timeouts=timeouts)
        yield SqlKeyStore(database)
        proxy.stop()
        database.dispose()

    def test_a_stale_pooled_connection_is_retried_the_ordinary_way(
        self, store: SqlKeyStore, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A database restart leaves a dead connection in the pool: the lookup still answers."""
        digest = hashlib.sha256(b"nobody").digest()
        assert store.find_by_digest(digest) is None  # pools one connection
        proxy.refuse()  # the database restarts: that connection is dead...
        proxy.resume()  # ...and new ones work
        retries: list[bytes] = []
        ordinary = store._find_by_digest_via_connection
        monkeypatch.setattr(
            store, "_find_by_digest_via_connection", lambda d: retries.append(d) or ordinary(d)
        )
        assert store.find_by_digest(digest) is None
        assert retries == [digest]

    def test_a_lookup_past_its_bound_is_not_retried(
        self, store: SqlKeyStore, proxy: TcpProxy
    ) -> None:
        """Behind silence the lookup fails at its read bound, not at twice that."""
        digest = hashlib.sha256(b"nobody").digest()
        assert store.find_by_digest(digest) is None
        proxy.blackhole()
        outcome, seconds = timed(lambda: store.find_by_digest(digest))
        assert isinstance(outcome, errors.Unavailable), outcome
        assert "in time" in str(outcome)
        assert 1.0 <= seconds <= 1.0 + SLACK


STALENESS = 1.0  # APIKEYS_MAX_STALENESS_SECONDS in these tests
FEED_READ_BOUND = 0.5
CONNECT_BOUND = 2.0


@pytest.fixture
def bounded_server(proxy: TcpProxy, postgres_url: str) -> Iterator[RunningServer]:
    yield from _serve(
        proxy,
        postgres_url,
        max_staleness_seconds=STALENESS,
        feed_poll_seconds=0.1,
        db_read_timeout_seconds=FEED_READ_BOUND,
    )


@pytest.fixture
def unbounded_server(proxy: TcpProxy, postgres_url: str) -> Iterator[RunningServer]:
    yield from _serve(proxy, postgres_url, max_staleness_seconds=STALENESS, follow_feed=False)


def _wait_health(server: RunningServer, status: int, bound: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < bound:
        if _health(server) == status:
            return time.monotonic() - started
    return None


class TestStalenessBound:
    def test_cached_answers_stop_past_the_bound_and_return_with_the_database(
        self, bounded_server: RunningServer, proxy: TcpProxy
    ) -> None:
        """Silence: cached keys answer until the feed has gone unconfirmed for the bound, then
        UNAVAILABLE (never a possibly stale VALID) with health NOT_SERVING; both come back
        within 2 s of the path returning."""
        client = bounded_server.client()
        cached, _, _ = _prepare(client)
        proxy.blackhole()
        assert client.verify(cached, SCOPES, tenant_id="acme").valid  # within the bound
        waited = _wait_health(
            bounded_server, health_pb2.HealthCheckResponse.NOT_SERVING, STALENESS + 2.0
        )
        assert waited is not None
        outcome, seconds = timed(lambda: client.verify(cached, SCOPES, tenant_id="acme"))
        assert isinstance(outcome, Unavailable), outcome
        assert seconds <= CONNECT_BOUND + SLACK  # a new connection: libpq's 2 s minimum

        proxy.resume()
        back = _wait_health(bounded_server, health_pb2.HealthCheckResponse.SERVING, RECOVERY)
        assert back is not None, "health did not turn SERVING within 2 s of the path returning"
        assert client.verify(cached, SCOPES, tenant_id="acme").valid

    def test_negative_control_without_the_feed_cached_answers_never_stop(
        self, unbounded_server: RunningServer, proxy: TcpProxy
    ) -> None:
        """A server not following the feed has nothing that bounds staleness: it keeps
        answering VALID from its cache however long the database is gone."""
        client = unbounded_server.client()
        cached, _, _ = _prepare(client)
        proxy.blackhole()
        deadline = time.monotonic() + STALENESS + 1.0
        while time.monotonic() < deadline:
            assert client.verify(cached, SCOPES, tenant_id="acme").valid
        assert _health(unbounded_server) == health_pb2.HealthCheckResponse.SERVING
