"""last_used_time over a real server: gathered on Verify, written only by batched flushes."""

import time
from datetime import UTC, datetime, timedelta

from apikeys.v1 import api_key_pb2, key_verifier_pb2
from apikeys_server.storage.database import open_database
from apikeys_server.storage.repository import SqlKeyStore
from tests.support import FakeClock, RunningServer, running_server, server_settings

VALID = key_verifier_pb2.VERIFY_CODE_VALID


def _last_used(key: api_key_pb2.ApiKey) -> datetime | None:
    return key.last_used_time.ToDatetime(tzinfo=UTC) if key.HasField("last_used_time") else None


def _flush(server: RunningServer) -> None:
    server.app.services.last_used.flush()


class TestSuccessfulVerify:
    def test_absent_before_flush_and_set_after(self, server: RunningServer) -> None:
        """A valid Verify writes nothing at once; after a flush last_used_time is its time."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            used_at = server.clock.advance(timedelta(minutes=3))
            assert client.verify(created.secret, ["passes:read"], tenant_id="acme").code == VALID
            assert _last_used(client.get_key(created.key.id, tenant_id="acme")) is None
            server.clock.advance(timedelta(minutes=3))
            _flush(server)
            assert _last_used(client.get_key(created.key.id, tenant_id="acme")) == used_at
            listed = {k.id: _last_used(k) for k in client.list_keys(tenant_id="acme")}
            assert listed[created.key.id] == used_at

    def test_latest_use_before_the_flush_wins(self, server: RunningServer) -> None:
        """Several verifies between flushes leave the time of the latest one."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            for _ in range(3):
                latest = server.clock.advance(timedelta(seconds=10))
                client.verify(created.secret, ["passes:read"], tenant_id="acme")
            _flush(server)
            assert _last_used(client.get_key(created.key.id, tenant_id="acme")) == latest

    def test_unused_key_stays_unset(self, server: RunningServer) -> None:
        """A key never verified has no last_used_time even after flushes."""
        with server.client() as client:
            used = client.create_key("used", ["passes:read"], tenant_id="acme")
            unused = client.create_key("unused", ["passes:read"], tenant_id="acme")
            client.verify(used.secret, ["passes:read"], tenant_id="acme")
            _flush(server)
            assert _last_used(client.get_key(used.key.id, tenant_id="acme")) is not None
            assert _last_used(client.get_key(unused.key.id, tenant_id="acme")) is None


class TestFailedVerify:
    def test_failed_verifies_do_not_set_it(self, server: RunningServer) -> None:
        """Revoked, expired, insufficient-scope and wrong-tenant answers record no use."""
        with server.client() as client:
            revoked = client.create_key("revoked", ["passes:read"], tenant_id="acme")
            client.revoke_key(revoked.key.id, tenant_id="acme")
            expiring = client.create_key(
                "expiring",
                ["passes:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(seconds=1),
            )
            narrow = client.create_key("narrow", ["passes:read"], tenant_id="acme")
            server.clock.advance(timedelta(seconds=1))

            codes = [
                client.verify(revoked.secret, ["passes:read"], tenant_id="acme").code,
                client.verify(expiring.secret, ["passes:read"], tenant_id="acme").code,
                client.verify(narrow.secret, ["passes:write"], tenant_id="acme").code,
                client.verify(narrow.secret, ["passes:read"], tenant_id="globex").code,
            ]
            assert codes == [
                key_verifier_pb2.VERIFY_CODE_REVOKED,
                key_verifier_pb2.VERIFY_CODE_EXPIRED,
                key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE,
                key_verifier_pb2.VERIFY_CODE_NOT_FOUND,
            ]
            _flush(server)
            keys = client.list_keys(tenant_id="acme", include_revoked=True)
            assert {k.name: _last_used(k) for k in keys} == {
                "revoked": None,
                "expiring": None,
                "narrow": None,
            }


class TestNeverBackwards:
    def test_older_use_after_flush_keeps_newer_time(self, server: RunningServer) -> None:
        """A use stamped earlier than the stored time (clock set back) does not lower it."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            start = server.clock.now()
            newer = server.clock.advance(timedelta(hours=1))
            client.verify(created.secret, ["passes:read"], tenant_id="acme")
            _flush(server)
            server.clock.set(start + timedelta(minutes=1))
            client.verify(created.secret, ["passes:read"], tenant_id="acme")
            _flush(server)
            assert _last_used(client.get_key(created.key.id, tenant_id="acme")) == newer

    def test_older_use_in_the_same_batch_keeps_newer_time(self, server: RunningServer) -> None:
        """Within one batch, a later-arriving but earlier-stamped use does not win."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            start = server.clock.now()
            newer = server.clock.advance(timedelta(hours=1))
            client.verify(created.secret, ["passes:read"], tenant_id="acme")
            server.clock.set(start + timedelta(minutes=1))
            client.verify(created.secret, ["passes:read"], tenant_id="acme")
            _flush(server)
            assert _last_used(client.get_key(created.key.id, tenant_id="acme")) == newer


class TestKeptAcrossChanges:
    def test_update_and_rotate_keep_last_used(self, server: RunningServer) -> None:
        """Renaming or rotating a key does not erase its recorded last use."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            used_at = server.clock.advance(timedelta(seconds=5))
            client.verify(created.secret, ["passes:read"], tenant_id="acme")
            _flush(server)
            renamed = client.update_key(created.key.id, tenant_id="acme", name="crm-sync-live")
            assert _last_used(renamed) == used_at
            rotated = client.rotate_key(created.key.id, timedelta(hours=1), tenant_id="acme")
            assert _last_used(rotated.previous) == used_at
            assert _last_used(rotated.key) is None

    def test_rotation_shows_old_key_no_longer_used(self, server: RunningServer) -> None:
        """After rotation, only the new key's last_used_time moves when clients switch over."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            old_used = server.clock.advance(timedelta(minutes=1))
            client.verify(old.secret, ["passes:read"], tenant_id="acme")
            rotated = client.rotate_key(old.key.id, timedelta(days=1), tenant_id="acme")
            _flush(server)
            new_used = server.clock.advance(timedelta(hours=2))
            client.verify(rotated.secret, ["passes:read"], tenant_id="acme")
            _flush(server)
            assert _last_used(client.get_key(old.key.id, tenant_id="acme")) == old_used
            assert _last_used(client.get_key(rotated.key.id, tenant_id="acme")) == new_used


class TestFlushing:
    def test_background_flusher_writes_without_explicit_flush(
        self, database_url: str, clock: FakeClock
    ) -> None:
        """With a short interval, the background thread writes last_used_time on its own."""
        settings = server_settings(database_url, last_used_flush_seconds=0.05)
        with running_server(settings, clock) as server, server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            used_at = clock.advance(timedelta(seconds=1))
            assert client.verify(created.secret, ["passes:read"], tenant_id="acme").code == VALID
            deadline = time.monotonic() + 10.0
            seen = None
            while seen is None and time.monotonic() < deadline:
                seen = _last_used(client.get_key(created.key.id, tenant_id="acme"))
                if seen is None:
                    time.sleep(0.02)
            assert seen == used_at

    def test_stop_flushes_pending_times(self, database_url: str, clock: FakeClock) -> None:
        """Uses not yet flushed when the server stops are written by app.stop()."""
        settings = server_settings(database_url)
        with running_server(settings, clock) as server, server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            used_at = clock.advance(timedelta(seconds=1))
            client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert _last_used(client.get_key(created.key.id, tenant_id="acme")) is None
        database = open_database(database_url)
        try:
            stored = SqlKeyStore(database).get_key("acme", created.key.id)
        finally:
            database.dispose()
        assert stored is not None
        assert stored.last_used_time == used_at

    def test_flush_with_nothing_pending_writes_nothing(self, server: RunningServer) -> None:
        """A flush right after another has nothing left to write."""
        _flush(server)
        assert server.app.services.last_used.flush() == 0
