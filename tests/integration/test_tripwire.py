"""The tripwire: keys presented after they stopped working, on SQLite and PostgreSQL."""

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import bindparam, update

from apikeys.v1 import api_key_pb2, key_verifier_pb2
from apikeys_client import Unauthenticated
from apikeys_server.domain.records import EventAction, KeyRecord
from apikeys_server.storage import migrate, repository
from apikeys_server.storage.database import open_database
from apikeys_server.storage.last_used import LastUsedRecorder
from apikeys_server.storage.models import UTCDateTime, api_keys
from apikeys_server.storage.repository import SqlKeyStore
from tests.support import FakeClock, RunningServer

PRESENTED = api_key_pb2.EVENT_ACTION_PRESENTED_AFTER_REVOCATION


def _flush(server: RunningServer) -> None:
    server.app.services.last_used.flush_presented()


def _presented_events(server: RunningServer, key_id: str) -> list[api_key_pb2.KeyEvent]:
    with server.client() as client:
        events = client.list_events(tenant_id="acme", key_id=key_id)
        return [e for e in events if e.action == PRESENTED]


def test_revoked_key_presented_to_verify(server: RunningServer) -> None:
    """The answer is unchanged; the key counts the presentations, one event a minute."""
    with server.client() as client:
        created = client.create_key("svc", ["passes:read"], tenant_id="acme")
        key_id = created.key.id
        client.revoke_key(key_id, tenant_id="acme")
        for _ in range(2):
            answer = client.verify(created.secret, tenant_id="acme")
            assert answer.code == key_verifier_pb2.VERIFY_CODE_REVOKED
        _flush(server)
        key = client.get_key(key_id, tenant_id="acme")
        assert key.presented_after_revocation_count == 2
        assert (
            key.presented_after_revocation_time.ToDatetime().replace(
                tzinfo=server.clock.now().tzinfo
            )
            == server.clock.now()
        )
        [event] = _presented_events(server, key_id)
        assert event.actor_key_id == server.admin_key_id
        # Within the minute: counted, no second event.
        server.clock.advance(timedelta(seconds=30))
        client.verify(created.secret, tenant_id="acme")
        _flush(server)
        assert client.get_key(key_id, tenant_id="acme").presented_after_revocation_count == 3
        assert len(_presented_events(server, key_id)) == 1
        # A minute after the last event: another.
        server.clock.advance(timedelta(seconds=31))
        client.verify(created.secret, tenant_id="acme")
        _flush(server)
        assert len(_presented_events(server, key_id)) == 2


def test_expired_caller_key(server: RunningServer) -> None:
    """An expired key sent as x-api-key is refused as before, and trips the wire itself."""
    with server.client() as client:
        created = client.create_key(
            "svc",
            ["apikeys:read"],
            tenant_id="acme",
            expire_time=server.clock.now() + timedelta(minutes=1),
        )
    server.clock.advance(timedelta(minutes=2))
    with server.client(created.secret) as client, pytest.raises(Unauthenticated):
        client.list_scopes()
    _flush(server)
    with server.client() as client:
        key = client.get_key(created.key.id, tenant_id="acme")
    assert key.presented_after_revocation_count == 1
    [event] = _presented_events(server, created.key.id)
    assert event.actor_key_id == created.key.id


def test_working_keys_do_not_trip(server: RunningServer) -> None:
    with server.client() as client:
        created = client.create_key("svc", ["passes:read"], tenant_id="acme")
        assert client.verify(created.secret, tenant_id="acme").valid
        _flush(server)
        key = client.get_key(created.key.id, tenant_id="acme")
    assert key.presented_after_revocation_count == 0
    assert not key.HasField("presented_after_revocation_time")
    assert _presented_events(server, created.key.id) == []


def test_updates_keep_the_tripwire(server: RunningServer) -> None:
    """A later change to the key (a leak report) does not reset the tripwire's columns."""
    with server.client() as client:
        created = client.create_key("svc", ["passes:read"], tenant_id="acme")
        client.revoke_key(created.key.id, tenant_id="acme")
        client.verify(created.secret, tenant_id="acme")
        _flush(server)
        client.revoke_leaked_keys([created.secret], source="scan")
        key = client.get_key(created.key.id, tenant_id="acme")
    assert key.presented_after_revocation_count == 1
    assert key.leak_source == "scan"


FLOOD_CALLS = 10_000
FLOOD_THREADS = 8


def test_a_flood_counts_every_presentation_and_logs_one_event(server: RunningServer) -> None:
    """10 000 presentations of a revoked key from 8 threads, flushed while they run: the count
    is exact and the audit trail has one event (all within the same minute)."""
    with server.client() as client:
        created = client.create_key("leaked-svc", ["passes:read"], tenant_id="acme")
        client.revoke_key(created.key.id, tenant_id="acme")
    flooding = threading.Event()
    flooding.set()

    def flush_meanwhile() -> None:
        while flooding.is_set():
            _flush(server)

    def flood(calls: int) -> None:
        with server.client() as client:
            for _ in range(calls):
                code = client.verify(created.secret, tenant_id="acme").code
                assert code == key_verifier_pb2.VERIFY_CODE_REVOKED

    flusher = threading.Thread(target=flush_meanwhile)
    flusher.start()
    with ThreadPoolExecutor(FLOOD_THREADS) as pool:
        list(pool.map(flood, [FLOOD_CALLS // FLOOD_THREADS] * FLOOD_THREADS))
    flooding.clear()
    flusher.join()
    _flush(server)
    with server.client() as client:
        key = client.get_key(created.key.id, tenant_id="acme")
    assert key.presented_after_revocation_count == FLOOD_CALLS
    assert len(_presented_events(server, created.key.id)) == 1


# Two processes (or replicas) on one database: each has its own store (engines, pools) and its
# own recorder, and they share nothing but the database, as `serve --processes 2` does.
PROCESSES = 2
THREADS_PER_PROCESS = 2
CALLS_PER_THREAD = 2_500
# Seconds after the first presentation, and whether an event is due then: the database has the
# last one at 0, 60 and 125 (30 and 100 are within a minute of the one before).
PHASES = [(0, True), (30, False), (60, True), (100, False), (125, True)]


@pytest.fixture
def processes(database_url: str) -> Iterator[list[tuple[SqlKeyStore, LastUsedRecorder]]]:
    databases = [open_database(database_url, pool_size=2) for _ in range(PROCESSES)]
    migrate.upgrade(databases[0])
    stores = [SqlKeyStore(database) for database in databases]
    yield [(store, LastUsedRecorder(store, 3600.0)) for store in stores]
    for database in databases:
        database.dispose()


def _revoked_key(store: SqlKeyStore, clock: FakeClock) -> KeyRecord:
    key = KeyRecord(
        id="key_leaked",
        tenant_id="acme",
        name="leaked",
        scopes=frozenset({"passes:read"}),
        hint="ak_test…",
        digest=os.urandom(32),
        create_time=clock.now(),
        revoke_time=clock.now(),
    )
    with store.transaction() as tx:
        tx.insert_key(key)
    return key


def _hammer(recorders: list[LastUsedRecorder], key: KeyRecord, clock: FakeClock) -> None:
    """Every process presents the key from its threads while its flush thread writes."""
    hammering = threading.Event()
    hammering.set()

    def present(recorder: LastUsedRecorder, presenter: str) -> None:
        for _ in range(CALLS_PER_THREAD):
            recorder.record_presented(key.id, key.tenant_id, clock.now(), presenter)

    def flush_meanwhile(recorder: LastUsedRecorder) -> None:
        while hammering.is_set():
            recorder.flush_presented()

    flushers = [threading.Thread(target=flush_meanwhile, args=(r,)) for r in recorders]
    for flusher in flushers:
        flusher.start()
    with ThreadPoolExecutor(len(recorders) * THREADS_PER_PROCESS) as pool:
        work = [
            pool.submit(present, recorder, f"key_gateway{n}")
            for n, recorder in enumerate(recorders)
            for _ in range(THREADS_PER_PROCESS)
        ]
        for done in work:
            done.result()
    hammering.clear()
    for flusher in flushers:
        flusher.join()
    for recorder in recorders:
        recorder.flush_presented()


def _event_times(store: SqlKeyStore, key: KeyRecord) -> list[timedelta]:
    events = store.list_events(key.tenant_id, key.id, None, 100)
    return sorted(
        e.time - key.create_time
        for e in events
        if e.action is EventAction.PRESENTED_AFTER_REVOCATION
    )


class TestAcrossProcesses:
    """The rate limit holds across processes: the database decides at flush time."""

    def test_one_event_a_minute_in_total_and_the_count_exact(
        self, processes: list[tuple[SqlKeyStore, LastUsedRecorder]], clock: FakeClock
    ) -> None:
        """Two processes flooding one revoked key over five phases in three minutes, flushing
        while they do: one event a minute window in all, and every presentation counted."""
        store = processes[0][0]
        key = _revoked_key(store, clock)
        recorders = [recorder for _, recorder in processes]
        start = clock.now()
        for seconds, _ in PHASES:
            clock.advance(start + timedelta(seconds=seconds) - clock.now())
            _hammer(recorders, key, clock)
        due = [timedelta(seconds=s) for s, event in PHASES if event]
        assert _event_times(store, key) == due
        written = store.get_key(key.tenant_id, key.id)
        assert written is not None
        per_phase = PROCESSES * THREADS_PER_PROCESS * CALLS_PER_THREAD
        assert written.presented_after_revocation_count == per_phase * len(PHASES)
        assert written.presented_after_revocation_time == start + timedelta(seconds=PHASES[-1][0])

    def test_without_the_database_condition_each_process_writes_its_own(
        self,
        processes: list[tuple[SqlKeyStore, LastUsedRecorder]],
        clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Negative control: with the claim unconditional, only each process's own memory
        limits the events, and two processes write two in the same minute."""
        unconditional = (
            update(api_keys)
            .where(api_keys.c.id == bindparam("key_id"))
            .values(presented_event_time=bindparam("presented", type_=UTCDateTime()))
        )
        monkeypatch.setattr(repository, "_CLAIM_EVENT", unconditional)
        store = processes[0][0]
        key = _revoked_key(store, clock)
        _hammer([recorder for _, recorder in processes], key, clock)
        assert _event_times(store, key) == [timedelta(0)] * PROCESSES
