"""The tripwire: keys presented after they stopped working, on SQLite and PostgreSQL."""

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from apikeys.v1 import api_key_pb2, key_verifier_pb2
from apikeys_client import Unauthenticated
from tests.support import RunningServer

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
