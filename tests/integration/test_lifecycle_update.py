"""UpdateKey over a real server: rename, re-scope, mask rules, state and tenant checks."""

from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2
from apikeys_client import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from apikeys_server.domain.key_format import digest
from apikeys_server.domain.records import VerifyRecord
from tests.support import FakeClock, RunningServer, running_server, server_settings

VALID = key_verifier_pb2.VERIFY_CODE_VALID
INSUFFICIENT_SCOPE = key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE


@pytest.fixture
def cached_server(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    """A server whose Verify cache would keep entries for an hour unless evicted."""
    settings = server_settings(database_url, cache_ttl_seconds=3600.0)
    with running_server(settings, clock) as running:
        yield running


def _events(server: RunningServer, key_id: str, tenant_id: str = "acme") -> list:
    with server.client() as client:
        return list(client.list_events(tenant_id=tenant_id, key_id=key_id))


class TestRename:
    def test_rename_is_returned_stored_and_verified(self, server: RunningServer) -> None:
        """A renamed key shows its new name in the response, GetKey and Verify; scopes stay."""
        with server.client() as client:
            created = client.create_key("crm-sync-dev", ["passes:read"], tenant_id="acme")
            updated = client.update_key(created.key.id, tenant_id="acme", name="crm-sync-prod")
            assert updated.name == "crm-sync-prod"
            assert list(updated.scopes) == ["passes:read"]
            assert client.get_key(created.key.id, tenant_id="acme").name == "crm-sync-prod"
            verified = client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert verified.code == VALID
            assert verified.name == "crm-sync-prod"

    def test_invalid_new_name_is_invalid_argument(self, server: RunningServer) -> None:
        """A new name outside the name rules is refused and the key keeps its old name."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            with pytest.raises(InvalidArgument):
                client.update_key(created.key.id, tenant_id="acme", name="has space")
            assert client.get_key(created.key.id, tenant_id="acme").name == "crm-sync-prod"


class TestScopes:
    def test_added_scope_verifies(self, server: RunningServer) -> None:
        """A scope added by UpdateKey is accepted by the next Verify."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            before = client.verify(created.secret, ["passes:write"], tenant_id="acme")
            assert before.code == INSUFFICIENT_SCOPE
            updated = client.update_key(
                created.key.id, tenant_id="acme", scopes=["passes:write", "passes:read"]
            )
            assert list(updated.scopes) == ["passes:read", "passes:write"]
            after = client.verify(created.secret, ["passes:write"], tenant_id="acme")
            assert after.code == VALID

    def test_removed_scope_fails_on_the_very_next_verify(
        self, cached_server: RunningServer
    ) -> None:
        """With the key cached for an hour, a removed scope is refused on the next Verify."""
        cache = cached_server.app.services.cache
        with cached_server.client() as client:
            created = client.create_key(
                "crm-sync-prod", ["passes:read", "passes:write"], tenant_id="acme"
            )
            warm = client.verify(created.secret, ["passes:write"], tenant_id="acme")
            assert warm.code == VALID
            assert isinstance(cache.get(digest(created.secret)), VerifyRecord)

            client.update_key(created.key.id, tenant_id="acme", scopes=["passes:read"])

            refused = client.verify(created.secret, ["passes:write"], tenant_id="acme")
            assert refused.code == INSUFFICIENT_SCOPE
            assert refused.http_status == 403
            assert list(refused.missing_scopes) == ["passes:write"]
            kept = client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert kept.code == VALID

    def test_name_and_scopes_in_one_call(self, server: RunningServer) -> None:
        """Both mask paths at once change both fields, in one UPDATED event."""
        with server.client() as client:
            created = client.create_key("crm-sync-dev", ["passes:read"], tenant_id="acme")
            updated = client.update_key(
                created.key.id, tenant_id="acme", name="crm-sync-prod", scopes=["customers:read"]
            )
            assert (updated.name, list(updated.scopes)) == ("crm-sync-prod", ["customers:read"])
        updates = [
            e
            for e in _events(server, created.key.id)
            if e.action == api_key_pb2.EVENT_ACTION_UPDATED
        ]
        assert len(updates) == 1
        assert {c.field for c in updates[0].changes} == {"name", "scopes"}

    def test_only_masked_fields_change(self, server: RunningServer) -> None:
        """Fields set in the request but absent from update_mask are left alone (AIP-134)."""
        with server.channel() as channel, server.client() as client:
            created = client.create_key("crm-sync-dev", ["passes:read"], tenant_id="acme")
            manager, _ = server.stubs(channel)
            request = key_manager_pb2.UpdateKeyRequest(
                tenant_id="acme",
                key_id=created.key.id,
                name="crm-sync-prod",
                scopes=["customers:write"],
                update_mask=FieldMask(paths=["name"]),
            )
            updated = manager.UpdateKey(request, metadata=(("x-api-key", server.admin_key),))
            assert updated.name == "crm-sync-prod"
            assert list(updated.scopes) == ["passes:read"]


class TestRefusals:
    @pytest.mark.parametrize(
        "scopes", [["passes:wirte"], ["passes:read", "nope:nope"], []], ids=str
    )
    def test_bad_scopes_are_invalid_argument(self, server: RunningServer, scopes: list) -> None:
        """Unknown scopes, or none at all, are refused and the key's scopes are unchanged."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            with pytest.raises(InvalidArgument):
                client.update_key(created.key.id, tenant_id="acme", scopes=scopes)
            assert list(client.get_key(created.key.id, tenant_id="acme").scopes) == ["passes:read"]

    @pytest.mark.parametrize(
        "paths", [[], ["hint"], ["name", "tenant_id"], ["expire_time"]], ids=str
    )
    def test_empty_or_unknown_mask_is_invalid_argument(
        self, server: RunningServer, paths: list
    ) -> None:
        """An empty update_mask or one naming a field that cannot be updated is refused."""
        with server.channel() as channel, server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            manager, _ = server.stubs(channel)
            request = key_manager_pb2.UpdateKeyRequest(
                tenant_id="acme",
                key_id=created.key.id,
                name="renamed",
                update_mask=FieldMask(paths=paths),
            )
            with pytest.raises(grpc.RpcError) as raised:
                manager.UpdateKey(request, metadata=(("x-api-key", server.admin_key),))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "update_mask" in raised.value.details()
            assert client.get_key(created.key.id, tenant_id="acme").name == "crm-sync-prod"

    def test_revoked_key_is_failed_precondition(self, server: RunningServer) -> None:
        """A revoked key cannot be renamed or re-scoped."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            client.revoke_key(created.key.id, tenant_id="acme", reason="leaked")
            with pytest.raises(FailedPrecondition):
                client.update_key(created.key.id, tenant_id="acme", name="crm-sync-new")
            with pytest.raises(FailedPrecondition):
                client.update_key(created.key.id, tenant_id="acme", scopes=["passes:write"])

    def test_other_tenants_key_is_not_found(self, server: RunningServer) -> None:
        """Naming another tenant's key id answers NOT_FOUND and leaves the key unchanged."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            with pytest.raises(NotFound):
                client.update_key(created.key.id, tenant_id="globex", name="stolen")
            assert client.get_key(created.key.id, tenant_id="acme").name == "crm-sync-prod"

    def test_unknown_key_is_not_found(self, server: RunningServer) -> None:
        """An id that names no key answers NOT_FOUND."""
        with server.client() as client, pytest.raises(NotFound):
            client.update_key("key_doesnotexist", tenant_id="acme", name="x")


class TestNoOp:
    def test_unchanged_values_write_no_event(self, server: RunningServer) -> None:
        """Setting the current name and scopes changes nothing and adds no audit event."""
        with server.client() as client:
            created = client.create_key(
                "crm-sync-prod", ["passes:read", "passes:write"], tenant_id="acme"
            )
            server.clock.advance(timedelta(seconds=1))
            same = client.update_key(
                created.key.id,
                tenant_id="acme",
                name="crm-sync-prod",
                scopes=["passes:write", "passes:read", "passes:read"],
            )
            assert same == client.get_key(created.key.id, tenant_id="acme")
            assert same.name == "crm-sync-prod"
            assert list(same.scopes) == ["passes:read", "passes:write"]
        events = _events(server, created.key.id)
        assert [e.action for e in events] == [api_key_pb2.EVENT_ACTION_CREATED]


class TestCallers:
    def test_tenant_caller_updates_own_key(self, server: RunningServer) -> None:
        """A tenant manage key updates its own tenant's keys without naming the tenant."""
        with server.client() as admin:
            target = admin.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            manager = admin.create_key("acme-admin", ["apikeys:manage"], tenant_id="acme")
        with server.client(manager.secret) as client:
            updated = client.update_key(target.key.id, name="crm-sync-live")
        assert updated.name == "crm-sync-live"
        assert updated.tenant_id == "acme"

    def test_tenant_key_without_manage_is_permission_denied(self, server: RunningServer) -> None:
        """A tenant key holding only apikeys:read cannot update its tenant's keys."""
        with server.client() as admin:
            target = admin.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            reader = admin.create_key("acme-reader", ["apikeys:read"], tenant_id="acme")
        with server.client(reader.secret) as client, pytest.raises(PermissionDenied):
            client.update_key(target.key.id, name="renamed")
