"""RotateKey over a real server: successor, overlap boundaries, refusals, concurrent rotations."""

import threading
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2
from apikeys_client import ApiKeysError, FailedPrecondition, InvalidArgument, NotFound
from tests.support import FakeClock, RunningServer, running_server, server_settings

VALID = key_verifier_pb2.VERIFY_CODE_VALID
EXPIRED = key_verifier_pb2.VERIFY_CODE_EXPIRED
MICROSECOND = timedelta(microseconds=1)


def _time(message) -> datetime:
    return message.ToDatetime(tzinfo=UTC)


class TestSuccessor:
    def test_new_key_copies_tenant_name_and_scopes(self, server: RunningServer) -> None:
        """The successor has the old key's tenant, name and scopes, and verifies with them."""
        with server.client() as client:
            old = client.create_key(
                "crm-sync-prod", ["passes:read", "customers:read"], tenant_id="acme"
            )
            rotated = client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")
            new = rotated.key
            assert new.id != old.key.id
            assert (new.tenant_id, new.name) == ("acme", "crm-sync-prod")
            assert list(new.scopes) == ["customers:read", "passes:read"]
            assert new.state == api_key_pb2.KEY_STATE_ACTIVE
            assert rotated.secret != old.secret
            verified = client.verify(
                rotated.secret, ["passes:read", "customers:read"], tenant_id="acme"
            )
            assert verified.code == VALID
            assert verified.key_id == new.id

    def test_links_between_old_and_new_are_stored(self, server: RunningServer) -> None:
        """previous.replaced_by and key.rotated_from name each other, in the reply and in GetKey."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            rotated = client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")
            assert rotated.previous.id == old.key.id
            assert rotated.previous.replaced_by == rotated.key.id
            assert rotated.key.rotated_from == old.key.id
            assert rotated.key.replaced_by == ""
            assert client.get_key(old.key.id, tenant_id="acme").replaced_by == rotated.key.id
            stored_new = client.get_key(rotated.key.id, tenant_id="acme")
            assert stored_new.rotated_from == old.key.id

    def test_secret_is_only_in_the_rotate_reply(self, server: RunningServer) -> None:
        """The new secret appears in RotateKeyResponse.secret and in no later read."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            rotated = client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")
            assert rotated.secret.startswith("ak_")
            assert rotated.secret not in str(rotated.key) + str(rotated.previous)
            reads = [
                client.get_key(rotated.key.id, tenant_id="acme"),
                client.get_key(old.key.id, tenant_id="acme"),
                *client.list_keys(tenant_id="acme", include_revoked=True),
            ]
        dumped = b"".join(m.SerializeToString() for m in reads)
        assert rotated.secret.encode() not in dumped
        assert rotated.secret[3:].encode() not in dumped

    def test_successor_can_itself_be_rotated(self, server: RunningServer) -> None:
        """Rotation chains: the successor is rotated next, not the original."""
        with server.client() as client:
            first = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            second = client.rotate_key(first.key.id, timedelta(hours=1), tenant_id="acme")
            third = client.rotate_key(second.key.id, timedelta(hours=1), tenant_id="acme")
            assert third.key.rotated_from == second.key.id
            assert third.previous.replaced_by == third.key.id


class TestOverlap:
    def test_old_key_valid_until_just_before_now_plus_overlap(self, server: RunningServer) -> None:
        """The old key verifies 1 µs before now+overlap and is EXPIRED at and after it."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            start = server.clock.now()
            rotated = client.rotate_key(old.key.id, timedelta(minutes=10), tenant_id="acme")
            end = start + timedelta(minutes=10)
            assert _time(rotated.previous.expire_time) == end
            assert rotated.previous.state == api_key_pb2.KEY_STATE_ACTIVE

            server.clock.set(end - MICROSECOND)
            assert client.verify(old.secret, ["passes:read"], tenant_id="acme").code == VALID
            server.clock.set(end)
            at_end = client.verify(old.secret, ["passes:read"], tenant_id="acme")
            assert at_end.code == EXPIRED
            assert at_end.http_status == 401
            server.clock.set(end + timedelta(days=1))
            assert client.verify(old.secret, ["passes:read"], tenant_id="acme").code == EXPIRED
            assert client.verify(rotated.secret, ["passes:read"], tenant_id="acme").code == VALID
            listed = client.get_key(old.key.id, tenant_id="acme")
            assert listed.state == api_key_pb2.KEY_STATE_EXPIRED

    def test_zero_overlap_ends_old_key_at_once(self, server: RunningServer) -> None:
        """With overlap 0 the old key is EXPIRED in the reply and on the next Verify."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            assert client.verify(old.secret, ["passes:read"], tenant_id="acme").code == VALID
            rotated = client.rotate_key(old.key.id, timedelta(0), tenant_id="acme")
            assert rotated.previous.state == api_key_pb2.KEY_STATE_EXPIRED
            assert _time(rotated.previous.expire_time) == server.clock.now()
            assert client.verify(old.secret, ["passes:read"], tenant_id="acme").code == EXPIRED
            assert client.verify(rotated.secret, ["passes:read"], tenant_id="acme").code == VALID

    def test_overlap_never_extends_past_own_expiry(self, server: RunningServer) -> None:
        """An old key expiring before now+overlap keeps its own expire_time (the minimum)."""
        with server.client() as client:
            own_end = server.clock.now() + timedelta(minutes=5)
            old = client.create_key(
                "crm-sync-prod", ["passes:read"], tenant_id="acme", expire_time=own_end
            )
            rotated = client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")
            assert _time(rotated.previous.expire_time) == own_end
            server.clock.set(own_end - MICROSECOND)
            assert client.verify(old.secret, ["passes:read"], tenant_id="acme").code == VALID
            server.clock.set(own_end)
            assert client.verify(old.secret, ["passes:read"], tenant_id="acme").code == EXPIRED

    def test_overlap_shortens_a_later_own_expiry(self, server: RunningServer) -> None:
        """An old key expiring after now+overlap is cut to now+overlap."""
        with server.client() as client:
            old = client.create_key(
                "crm-sync-prod",
                ["passes:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(days=7),
            )
            rotated = client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")
            assert _time(rotated.previous.expire_time) == server.clock.now() + timedelta(hours=1)

    def test_default_maximum_is_thirty_days(self, server: RunningServer) -> None:
        """30 days of overlap is accepted; a second more is INVALID_ARGUMENT."""
        with server.client() as client:
            refused = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            with pytest.raises(InvalidArgument):
                client.rotate_key(refused.key.id, timedelta(days=30, seconds=1), tenant_id="acme")
            assert client.get_key(refused.key.id, tenant_id="acme").replaced_by == ""
            rotated = client.rotate_key(refused.key.id, timedelta(days=30), tenant_id="acme")
            assert _time(rotated.previous.expire_time) == server.clock.now() + timedelta(days=30)

    @pytest.mark.parametrize(
        "overlap",
        [
            Duration(seconds=-1),
            Duration(nanos=-1000),
            Duration(seconds=1, nanos=-5),
            Duration(seconds=400 * 86400),
        ],
        ids=["minus-1s", "minus-1us", "mixed-signs", "400-days"],
    )
    def test_bad_overlap_is_invalid_argument(
        self, server: RunningServer, overlap: Duration
    ) -> None:
        """Negative, malformed or absurd overlaps are refused and nothing is rotated."""
        with server.channel() as channel, server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            manager, _ = server.stubs(channel)
            request = key_manager_pb2.RotateKeyRequest(
                tenant_id="acme", key_id=old.key.id, overlap=overlap
            )
            with pytest.raises(grpc.RpcError) as raised:
                manager.RotateKey(request, metadata=(("x-api-key", server.admin_key),))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "overlap" in raised.value.details()
            keys = list(client.list_keys(tenant_id="acme", include_revoked=True))
            assert [k.id for k in keys] == [old.key.id]

    def test_maximum_is_configurable(self, database_url: str, clock: FakeClock) -> None:
        """max_rotation_overlap=90 days accepts 60 days and refuses 91."""
        settings = server_settings(database_url, max_rotation_overlap=timedelta(days=90))
        with running_server(settings, clock) as server, server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            with pytest.raises(InvalidArgument):
                client.rotate_key(old.key.id, timedelta(days=91), tenant_id="acme")
            rotated = client.rotate_key(old.key.id, timedelta(days=60), tenant_id="acme")
            assert _time(rotated.previous.expire_time) == clock.now() + timedelta(days=60)


class TestRefusals:
    def test_revoked_key_is_failed_precondition(self, server: RunningServer) -> None:
        """A revoked key cannot be rotated."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            client.revoke_key(old.key.id, tenant_id="acme")
            with pytest.raises(FailedPrecondition):
                client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")

    def test_already_rotated_key_is_failed_precondition(self, server: RunningServer) -> None:
        """A key that already has a successor cannot be rotated again, even inside its overlap."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            first = client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")
            with pytest.raises(FailedPrecondition) as raised:
                client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")
            assert first.key.id in raised.value.details
            assert client.get_key(old.key.id, tenant_id="acme").replaced_by == first.key.id

    def test_expired_key_is_failed_precondition(self, server: RunningServer) -> None:
        """A key past its expire_time cannot be rotated."""
        with server.client() as client:
            old = client.create_key(
                "crm-sync-prod",
                ["passes:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(hours=1),
            )
            server.clock.advance(timedelta(hours=1))
            with pytest.raises(FailedPrecondition):
                client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")

    def test_other_tenants_key_is_not_found(self, server: RunningServer) -> None:
        """Rotating another tenant's key id answers NOT_FOUND and creates nothing."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            with pytest.raises(NotFound):
                client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="globex")
            assert list(client.list_keys(tenant_id="globex")) == []
            assert client.get_key(old.key.id, tenant_id="acme").replaced_by == ""


class TestConcurrentRotations:
    THREADS = 8

    def test_exactly_one_of_many_rotations_wins(self, server: RunningServer) -> None:
        """N simultaneous rotations of one key: one succeeds, the rest FAILED_PRECONDITION."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
        barrier = threading.Barrier(self.THREADS)
        outcomes: list[object] = []
        lock = threading.Lock()

        def rotate() -> None:
            with server.client() as own:
                barrier.wait(timeout=10)
                try:
                    result: object = own.rotate_key(
                        old.key.id, timedelta(hours=1), tenant_id="acme"
                    )
                except ApiKeysError as error:
                    result = error
            with lock:
                outcomes.append(result)

        threads = [threading.Thread(target=rotate) for _ in range(self.THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(outcomes) == self.THREADS

        wins = [o for o in outcomes if isinstance(o, key_manager_pb2.RotateKeyResponse)]
        losses = [o for o in outcomes if not isinstance(o, key_manager_pb2.RotateKeyResponse)]
        assert len(wins) == 1
        assert all(isinstance(o, FailedPrecondition) for o in losses), losses

        with server.client() as client:
            keys = list(client.list_keys(tenant_id="acme", include_revoked=True))
            successors = [k for k in keys if k.rotated_from == old.key.id]
            assert [k.id for k in successors] == [wins[0].key.id]
            assert len(keys) == 2
            assert client.get_key(old.key.id, tenant_id="acme").replaced_by == wins[0].key.id
            rotations = [
                e
                for e in client.list_events(tenant_id="acme", key_id=old.key.id)
                if e.action == api_key_pb2.EVENT_ACTION_ROTATED
            ]
            assert len(rotations) == 1
