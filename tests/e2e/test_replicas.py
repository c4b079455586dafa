"""Three replicas as separate ``apikeys-server serve`` processes on one PostgreSQL database.

A change made through A must reach B's and C's caches through the change feed: the cache TTL is
an hour, so nothing else can explain a fresh answer (the negative control, a replica started
with APIKEYS_FOLLOW_FEED=false, stays stale). Times are measured and printed; the assertions
are only the bound a test can hold on a busy machine. ``python -m bench propagation`` measures
the same with hundreds of trials under load (BENCHMARKS.md).
"""

import statistics
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from apikeys.v1 import key_verifier_pb2
from apikeys_client import ApiKeysClient
from apikeys_server.storage.database import open_database
from apikeys_server.storage.feed import SqlChangeFeed
from bench.pg import kill_listener, listener_backends
from bench.propagation import warm
from tests.e2e.conftest import ServerProcess, start_server, truncate

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

VALID = key_verifier_pb2.VERIFY_CODE_VALID
REVOKED = key_verifier_pb2.VERIFY_CODE_REVOKED
EXPIRED = key_verifier_pb2.VERIFY_CODE_EXPIRED
INSUFFICIENT_SCOPE = key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
TRIALS = 20
KILL_TRIALS = 5
BOUND = 2.0  # seconds each trial polls for the change; the feed's goal is 0.1 s
STALE_WATCH = 1.0  # seconds the negative control watches a replica stay stale
CACHED_FOR_AN_HOUR = {"APIKEYS_CACHE_TTL_SECONDS": "3600"}
READ, WRITE = "passes:read", "passes:write"


@pytest.fixture(scope="module")
def replicas(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProcess]]:
    """A, B and C following the feed, and D not following it (the negative control)."""
    truncate(postgres_url)
    directory = tmp_path_factory.mktemp("replicas")
    started: dict[str, ServerProcess] = {}
    try:
        for name in "ABC":
            started[name] = start_server(postgres_url, directory, CACHED_FOR_AN_HOUR)
        started["D"] = start_server(
            postgres_url, directory, {**CACHED_FOR_AN_HOUR, "APIKEYS_FOLLOW_FEED": "false"}
        )
        yield started
    finally:
        for server in started.values():
            server.check_stopped_cleanly()


@pytest.fixture(scope="module")
def feed(postgres_url: str) -> Iterator[SqlChangeFeed]:
    """The feed's head, read directly: a key is warmed only once B and C applied its creation."""
    database = open_database(postgres_url, pool_size=1)
    yield SqlChangeFeed(database)
    database.dispose()


def _clients(servers: dict[str, ServerProcess], *names: str) -> list[ApiKeysClient]:
    admin = servers["A"].admin_key
    return [servers[name].client(admin) for name in names]


def _until(
    code: int, clients: list[ApiKeysClient], secret: str, scopes: list[str], bound: float
) -> list[float | None]:
    """Seconds until each client's Verify answers ``code`` (None: not within ``bound``),
    counted from the call; the clients are polled in turn."""
    started = time.monotonic()
    seen: list[float | None] = [None] * len(clients)
    while time.monotonic() - started < bound and None in seen:
        for index, client in enumerate(clients):
            if seen[index] is None and client.verify(secret, scopes, tenant_id="acme").code == code:
                seen[index] = time.monotonic() - started
    return seen


def _report(what: str, times: list[float]) -> None:
    ordered = sorted(times)
    print(
        f"{what}: {len(ordered)} answers, median {statistics.median(ordered) * 1000:.1f} ms, "
        f"max {ordered[-1] * 1000:.1f} ms"
    )


@pytest.mark.parametrize("change", ["revoke", "remove scope", "rotate overlap 0"])
def test_a_change_through_a_reaches_b_and_c(
    replicas: dict[str, ServerProcess], feed: SqlChangeFeed, change: str
) -> None:
    """Each trial: a key warm in B's and C's caches, changed through A; B and C answer the
    change within the bound (they are polled from A's acknowledgement)."""
    a, b, c = _clients(replicas, "A", "B", "C")
    times: list[float] = []
    with a, b, c:
        for _ in range(TRIALS):
            if change == "revoke":
                key_id, secret = warm(a, [b, c], [READ], feed)
                a.revoke_key(key_id, tenant_id="acme")
                code, asked = REVOKED, [READ]
            elif change == "remove scope":
                key_id, secret = warm(a, [b, c], [READ, WRITE], feed)
                a.update_key(key_id, tenant_id="acme", scopes=[READ])
                code, asked = INSUFFICIENT_SCOPE, [WRITE]
            else:
                key_id, secret = warm(a, [b, c], [READ], feed)
                a.rotate_key(key_id, timedelta(0), tenant_id="acme")
                code, asked = EXPIRED, [READ]
            seen = _until(code, [b, c], secret, asked, BOUND)
            assert None not in seen, f"{change}: not seen by B/C within {BOUND} s: {seen}"
            times.extend(t for t in seen if t is not None)
    _report(change, times)


def test_negative_control_a_replica_not_following_the_feed_stays_stale(
    replicas: dict[str, ServerProcess], feed: SqlChangeFeed
) -> None:
    """D (APIKEYS_FOLLOW_FEED=false, TTL an hour) keeps answering VALID for a key revoked
    through A, while B, following the feed, answers REVOKED: only the feed explains B."""
    a, b, d = _clients(replicas, "A", "B", "D")
    with a, b, d:
        key_id, secret = warm(a, [b], [READ], feed)
        assert d.verify(secret, [READ], tenant_id="acme").code == VALID  # D has no position
        a.revoke_key(key_id, tenant_id="acme")
        assert _until(REVOKED, [b], secret, [READ], BOUND) != [None]
        assert _until(REVOKED, [d], secret, [READ], STALE_WATCH) == [None]
        assert d.verify(secret, [READ], tenant_id="acme").code == VALID


def test_a_killed_listener_still_sees_a_revocation_made_meanwhile(
    replicas: dict[str, ServerProcess], postgres_url: str, feed: SqlChangeFeed
) -> None:
    """pg_terminate_backend on B's LISTEN connection (found by B's own ports, once it is back
    from the previous kill), then a revocation through A: B still answers REVOKED in time
    (its poll, or its reconnection, reads the feed)."""
    database = make_url(postgres_url).database or ""
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    pid = replicas["B"].process.pid
    a, b = _clients(replicas, "A", "B")
    times: list[float] = []
    killed: list[int] = []
    try:
        with a, b:
            for _ in range(KILL_TRIALS):
                key_id, secret = warm(a, [b], [READ], feed)
                killed.append(kill_listener(admin, database, pid))
                a.revoke_key(key_id, tenant_id="acme")
                [seen] = _until(REVOKED, [b], secret, [READ], BOUND)
                assert seen is not None, f"B did not see the revocation within {BOUND} s"
                times.append(seen)
        assert len(set(killed)) == KILL_TRIALS  # a new connection each time
        with admin.connect() as connection:
            alive = connection.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": killed},
            ).scalar_one()
        assert alive == 0
    finally:
        admin.dispose()
    _report("revoke after killing B's listener", times)
    assert "change feed listener: connection lost" in replicas["B"].log()


def test_only_b_listener_is_killed(replicas: dict[str, ServerProcess], postgres_url: str) -> None:
    """The helper finds one process's LISTEN connection, not another replica's."""
    database = make_url(postgres_url).database or ""
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        backends = {
            name: listener_backends(admin, database, server.process.pid)
            for name, server in replicas.items()
        }
    finally:
        admin.dispose()
    assert backends["D"] == []  # not following: no listener
    assert len(backends["A"]) == 1  # never killed
    listening = [backends[name] for name in "ABC"]
    assert all(len(found) <= 1 for found in listening)
    flat = [pid for found in listening for pid in found]
    assert len(flat) == len(set(flat))
