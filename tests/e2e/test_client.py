"""The Python client (apikeys_client.ApiKeysClient) against a real server process."""

import socket
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from apikeys.v1 import api_key_pb2, key_verifier_pb2
from apikeys_client import (
    AlreadyGone,
    ApiKeysClient,
    ApiKeysError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from tests.e2e.conftest import ServerProcess, free_port

pytestmark = pytest.mark.e2e

VALID = key_verifier_pb2.VERIFY_CODE_VALID
REVOKED = key_verifier_pb2.VERIFY_CODE_REVOKED
EXPIRED = key_verifier_pb2.VERIFY_CODE_EXPIRED
INSUFFICIENT_SCOPE = key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
NOT_FOUND = key_verifier_pb2.VERIFY_CODE_NOT_FOUND


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


class TestLifecycle:
    def test_create_get_verify(self, e2e_server: ServerProcess, tenant: str) -> None:
        """A created key reads back without its secret and verifies with the scopes it has."""
        expire = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
        with e2e_server.client() as client:
            created = client.create_key(
                "crm-sync-prod",
                ["passes:read", "customers:read"],
                tenant_id=tenant,
                expire_time=expire,
            )
            fetched = client.get_key(created.key.id, tenant_id=tenant)
            answer = client.verify(created.secret, ["passes:read"], tenant_id=tenant)
        assert fetched == created.key
        assert fetched.state == api_key_pb2.KEY_STATE_ACTIVE
        assert fetched.expire_time.ToDatetime(tzinfo=UTC) == expire
        assert created.secret not in str(fetched)
        assert answer.valid
        assert answer.code == VALID
        assert answer.http_status == 200
        assert answer.key_id == created.key.id
        assert answer.name == "crm-sync-prod"
        assert answer.expire_time.ToDatetime(tzinfo=UTC) == expire

    def test_list_keys_pages_lazily(self, e2e_server: ServerProcess, tenant: str) -> None:
        """list_keys walks more than one page and fetches later pages only when reached."""
        with e2e_server.client() as client:
            ids = {
                client.create_key(f"svc-{n}", ["passes:read"], tenant_id=tenant).key.id
                for n in range(5)
            }
            order = [k.id for k in client.list_keys(tenant_id=tenant, page_size=2)]
            assert sorted(order) == sorted(ids)
            keys = client.list_keys(tenant_id=tenant, page_size=2)
            first = next(keys)
            # The last key sits on the third page, not fetched yet: revoking it now hides it.
            client.revoke_key(order[-1], tenant_id=tenant)
            rest = [k.id for k in keys]
            with_revoked = [
                k.id for k in client.list_keys(tenant_id=tenant, page_size=2, include_revoked=True)
            ]
        assert first.id == order[0]
        assert rest == order[1:-1]
        assert with_revoked == order

    def test_list_keys_by_name_prefix(self, e2e_server: ServerProcess, tenant: str) -> None:
        """name_prefix keeps only the keys whose names start with it."""
        with e2e_server.client() as client:
            client.create_key("billing-prod", ["passes:read"], tenant_id=tenant)
            wanted = client.create_key("crm-prod", ["passes:read"], tenant_id=tenant).key.id
            found = [k.id for k in client.list_keys(tenant_id=tenant, name_prefix="crm")]
        assert found == [wanted]

    def test_update_changes_name_and_scopes(self, e2e_server: ServerProcess, tenant: str) -> None:
        """update_key renames and re-scopes; the very next Verify sees the new scopes."""
        with e2e_server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=tenant)
            before = client.verify(created.secret, ["passes:write"], tenant_id=tenant)
            updated = client.update_key(
                created.key.id, tenant_id=tenant, name="svc-renamed", scopes=["passes:write"]
            )
            after = client.verify(created.secret, ["passes:write"], tenant_id=tenant)
            lost = client.verify(created.secret, ["passes:read"], tenant_id=tenant)
        assert before.code == INSUFFICIENT_SCOPE
        assert updated.name == "svc-renamed"
        assert list(updated.scopes) == ["passes:write"]
        assert after.code == VALID
        assert after.name == "svc-renamed"
        assert lost.code == INSUFFICIENT_SCOPE
        assert list(lost.missing_scopes) == ["passes:read"]

    def test_rotate_with_overlap_keeps_both_keys(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """rotate_key issues a linked successor; the old key still verifies during the overlap."""
        with e2e_server.client() as client:
            old = client.create_key("svc", ["passes:read"], tenant_id=tenant)
            rotation = client.rotate_key(old.key.id, timedelta(minutes=10), tenant_id=tenant)
            new_answer = client.verify(rotation.secret, ["passes:read"], tenant_id=tenant)
            old_answer = client.verify(old.secret, ["passes:read"], tenant_id=tenant)
            with pytest.raises(FailedPrecondition) as again:
                client.rotate_key(old.key.id, timedelta(minutes=10), tenant_id=tenant)
        assert rotation.secret != old.secret
        assert rotation.key.rotated_from == old.key.id
        assert rotation.previous.replaced_by == rotation.key.id
        assert rotation.previous.HasField("expire_time")
        assert list(rotation.key.scopes) == ["passes:read"]
        assert new_answer.code == VALID
        assert new_answer.key_id == rotation.key.id
        assert old_answer.code == VALID
        assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION

    def test_rotate_without_overlap_expires_old_key(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """With a zero overlap the old key stops verifying (EXPIRED) and the new one works."""
        with e2e_server.client() as client:
            old = client.create_key("svc", ["passes:read"], tenant_id=tenant)
            rotation = client.rotate_key(old.key.id, timedelta(0), tenant_id=tenant)
            old_answer = client.verify(old.secret, ["passes:read"], tenant_id=tenant)
            new_answer = client.verify(rotation.secret, ["passes:read"], tenant_id=tenant)
        assert old_answer.code == EXPIRED
        assert old_answer.http_status == 401
        assert new_answer.code == VALID

    def test_revoke_is_immediate_and_idempotent(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """After revoke_key returns, Verify says REVOKED; revoking again changes nothing."""
        with e2e_server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=tenant)
            assert client.verify(created.secret, tenant_id=tenant).code == VALID
            revoked = client.revoke_key(created.key.id, tenant_id=tenant, reason="leaked")
            answer = client.verify(created.secret, ["passes:read"], tenant_id=tenant)
            again = client.revoke_key(created.key.id, tenant_id=tenant, reason="other")
            listed = [k.id for k in client.list_keys(tenant_id=tenant)]
        assert revoked.state == api_key_pb2.KEY_STATE_REVOKED
        assert revoked.revoke_reason == "leaked"
        assert answer.code == REVOKED
        assert answer.http_status == 401
        assert again == revoked
        assert created.key.id not in listed

    def test_list_scopes_is_the_catalog(self, e2e_server: ServerProcess) -> None:
        """list_scopes returns the default catalog, reserved scopes included, with descriptions."""
        with e2e_server.client() as client:
            scopes = {s.name: s.description for s in client.list_scopes()}
        for name in (
            "passes:read",
            "passes:write",
            "customers:read",
            "customers:write",
            "apikeys:manage",
            "apikeys:read",
            "apikeys:verify",
        ):
            assert name in scopes
        assert all(scopes.values())

    def test_list_events_is_the_audit_trail(self, e2e_server: ServerProcess, tenant: str) -> None:
        """list_events pages over a key's history, newest first, naming the acting key."""
        with e2e_server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=tenant)
            client.update_key(created.key.id, tenant_id=tenant, name="svc-2")
            client.revoke_key(created.key.id, tenant_id=tenant, reason="done")
            events = list(client.list_events(tenant_id=tenant, key_id=created.key.id, page_size=1))
            actor = client.verify(e2e_server.admin_key, tenant_id="_platform").key_id
        assert [e.action for e in events] == [
            api_key_pb2.EVENT_ACTION_REVOKED,
            api_key_pb2.EVENT_ACTION_UPDATED,
            api_key_pb2.EVENT_ACTION_CREATED,
        ]
        assert {e.key_id for e in events} == {created.key.id}
        assert {e.actor_key_id for e in events} == {actor}
        renamed = {c.field: (c.old_value, c.new_value) for c in events[1].changes}
        assert renamed["name"] == ("svc", "svc-2")
        assert created.secret not in str(events)


class TestErrors:
    def test_unknown_key_is_not_found(self, e2e_server: ServerProcess, tenant: str) -> None:
        """get_key of an id that does not exist raises NotFound carrying NOT_FOUND."""
        with e2e_server.client() as client, pytest.raises(NotFound) as raised:
            client.get_key("key_doesnotexist", tenant_id=tenant)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert "key_doesnotexist" in raised.value.details
        assert isinstance(raised.value, ApiKeysError)

    def test_unknown_scope_is_invalid_argument(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """create_key with an unknown scope raises InvalidArgument naming the scope."""
        with e2e_server.client() as client, pytest.raises(InvalidArgument) as raised:
            client.create_key("svc", ["passes:wirte"], tenant_id=tenant)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "passes:wirte" in raised.value.details

    def test_negative_page_size_is_invalid_argument(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """A negative page size raises InvalidArgument."""
        with e2e_server.client() as client, pytest.raises(InvalidArgument) as raised:
            list(client.list_keys(tenant_id=tenant, page_size=-1))
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT

    def test_unknown_caller_key_is_unauthenticated(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """A caller key the service never issued raises Unauthenticated on any call."""
        with (
            e2e_server.client("ak_not_a_real_key") as client,
            pytest.raises(Unauthenticated) as raised,
        ):
            client.list_scopes()
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED

    def test_revoked_caller_key_is_unauthenticated(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """A caller key stops working as soon as it is revoked."""
        with e2e_server.client() as admin:
            caller = admin.create_key("ops", ["apikeys:read"], tenant_id=tenant)
            with e2e_server.client(caller.secret) as client:
                assert client.list_scopes()
                admin.revoke_key(caller.key.id, tenant_id=tenant)
                with pytest.raises(Unauthenticated):
                    client.list_scopes()

    def test_missing_reserved_scope_is_permission_denied(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """A read-only caller key may list but not create: PermissionDenied naming the scope."""
        with e2e_server.client() as admin:
            reader = admin.create_key("reader", ["apikeys:read"], tenant_id=tenant).secret
        with e2e_server.client(reader) as client:
            assert list(client.list_keys()) != []
            with pytest.raises(PermissionDenied) as raised:
                client.create_key("svc", ["passes:read"])
            with pytest.raises(PermissionDenied):
                client.verify(reader)
        assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "apikeys:manage" in raised.value.details

    def test_tenant_key_sees_other_tenant_keys_as_not_found(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """A tenant's manager key cannot reach another tenant's key, by id or by tenant."""
        other = tenant + "-other"
        with e2e_server.client() as admin:
            manager = admin.create_key("ops", ["apikeys:manage", "apikeys:read"], tenant_id=tenant)
            foreign = admin.create_key("svc", ["passes:read"], tenant_id=other)
        with e2e_server.client(manager.secret) as client:
            with pytest.raises(NotFound):
                client.get_key(foreign.key.id)
            with pytest.raises(NotFound):
                client.revoke_key(foreign.key.id)
            with pytest.raises(PermissionDenied):
                client.get_key(foreign.key.id, tenant_id=other)
            own = client.create_key("svc", ["passes:read"])
        assert own.key.tenant_id == tenant
        with e2e_server.client() as admin:
            answer = admin.verify(foreign.secret, tenant_id=other)
        assert answer.code == VALID


class TestConnection:
    def test_context_manager_closes_the_channel(self, e2e_server: ServerProcess) -> None:
        """After the with-block the client's own channel is closed and refuses calls."""
        client = e2e_server.client()
        with client:
            assert client.list_scopes()
        with pytest.raises(ValueError, match="closed channel"):
            client.list_scopes()

    def test_borrowed_channel_stays_open(self, e2e_server: ServerProcess) -> None:
        """A channel passed in by the caller is not closed by the client."""
        with grpc.insecure_channel(e2e_server.target) as channel:
            with ApiKeysClient("", e2e_server.admin_key, channel=channel) as client:
                assert client.list_scopes()
            with ApiKeysClient("", e2e_server.admin_key, channel=channel) as again:
                assert again.list_scopes()

    def test_nothing_listening_is_unavailable(self) -> None:
        """With the default deadline, a port with no server gives a typed error, not a hang."""
        client = ApiKeysClient(f"127.0.0.1:{free_port()}", "ak_x")
        with client, pytest.raises((Unavailable, AlreadyGone)) as raised:
            client.list_scopes()
        assert raised.value.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )

    def test_silent_server_hits_the_deadline(self) -> None:
        """A peer that accepts TCP but never speaks gRPC ends the call at the deadline."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            target = f"127.0.0.1:{silent.getsockname()[1]}"
            client = ApiKeysClient(target, "ak_x", timeout=0.5)
            with client, pytest.raises(AlreadyGone) as raised:
                client.verify("ak_x")
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
