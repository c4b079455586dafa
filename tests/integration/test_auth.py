"""Who may call: the x-api-key caller key, its reserved scopes, and the tenants it acts on."""

from dataclasses import dataclass
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2
from apikeys_server.domain import scopes as reserved
from apikeys_server.domain.key_format import KeyFormat
from tests.support import ADMIN_SCOPES, RunningServer

TENANT = "acme"
OTHER = "globex"
OK = grpc.StatusCode.OK


@dataclass(frozen=True)
class Target:
    """An existing key the calls act on."""

    key_id: str
    secret: str


def _requests(tenant_id: str, target: Target) -> dict[str, tuple[str, str, object]]:
    """RPC name -> (service, method, request); each request is valid for a permitted caller."""
    return {
        "CreateKey": (
            "manager",
            "CreateKey",
            key_manager_pb2.CreateKeyRequest(
                tenant_id=tenant_id, name="new-key", scopes=["passes:read"]
            ),
        ),
        "GetKey": (
            "manager",
            "GetKey",
            key_manager_pb2.GetKeyRequest(tenant_id=tenant_id, key_id=target.key_id),
        ),
        "ListKeys": ("manager", "ListKeys", key_manager_pb2.ListKeysRequest(tenant_id=tenant_id)),
        "UpdateKey": (
            "manager",
            "UpdateKey",
            key_manager_pb2.UpdateKeyRequest(
                tenant_id=tenant_id,
                key_id=target.key_id,
                name="renamed",
                update_mask=FieldMask(paths=["name"]),
            ),
        ),
        "RotateKey": (
            "manager",
            "RotateKey",
            key_manager_pb2.RotateKeyRequest(
                tenant_id=tenant_id, key_id=target.key_id, overlap=Duration(seconds=60)
            ),
        ),
        "RevokeKey": (
            "manager",
            "RevokeKey",
            key_manager_pb2.RevokeKeyRequest(tenant_id=tenant_id, key_id=target.key_id),
        ),
        "ListScopes": ("manager", "ListScopes", key_manager_pb2.ListScopesRequest()),
        "RevokeLeakedKeys": (
            "manager",
            "RevokeLeakedKeys",
            key_manager_pb2.RevokeLeakedKeysRequest(secrets=[target.secret], source="test"),
        ),
        "ListEvents": (
            "manager",
            "ListEvents",
            key_manager_pb2.ListEventsRequest(tenant_id=tenant_id),
        ),
        "Verify": (
            "verifier",
            "Verify",
            key_verifier_pb2.VerifyRequest(
                key=target.secret, tenant_id=tenant_id, required_scopes=["passes:read"]
            ),
        ),
        "WatchKeyChanges": (
            "verifier",
            "WatchKeyChanges",
            key_verifier_pb2.WatchKeyChangesRequest(tenant_id=tenant_id),
        ),
    }


NEEDED_SCOPE = {
    "CreateKey": reserved.MANAGE,
    "GetKey": reserved.READ,
    "ListKeys": reserved.READ,
    "UpdateKey": reserved.MANAGE,
    "RotateKey": reserved.MANAGE,
    "RevokeKey": reserved.MANAGE,
    "RevokeLeakedKeys": reserved.MANAGE,
    "ListScopes": reserved.READ,
    "ListEvents": reserved.READ,
    "Verify": reserved.VERIFY,
    "WatchKeyChanges": reserved.VERIFY,
}
SERVICES = (
    key_manager_pb2.DESCRIPTOR.services_by_name["KeyManager"],
    key_verifier_pb2.DESCRIPTOR.services_by_name["KeyVerifier"],
)
# From the descriptors, not from NEEDED_SCOPE: a new RPC is in every test below until this
# module says which scope it needs and how to call it.
RPCS = [method.name for service in SERVICES for method in service.methods]
# RevokeLeakedKeys names no tenant: the secret decides (tests/integration/test_revoke_leaked.py).
TENANT_RPCS = [rpc for rpc in RPCS if rpc not in ("ListScopes", "RevokeLeakedKeys")]
# A platform key with no tenant_id watches every tenant at once.
NAMED_TENANT_RPCS = [rpc for rpc in TENANT_RPCS if rpc != "WatchKeyChanges"]
KEY_ID_RPCS = ["GetKey", "UpdateKey", "RotateKey", "RevokeKey"]


def _call(
    server: RunningServer, rpc: str, caller_key: str | None, tenant_id: str, target: Target
) -> tuple[grpc.StatusCode, str]:
    """Makes one call; answers its status code and details (OK and '' on success)."""
    service, method, request = _requests(tenant_id, target)[rpc]
    metadata = () if caller_key is None else (("x-api-key", caller_key),)
    with server.channel() as channel:
        manager, verifier = server.stubs(channel)
        stub = manager if service == "manager" else verifier
        try:
            answer = getattr(stub, method)(request, metadata=metadata, timeout=10)
            if isinstance(answer, grpc.Call):  # a stream: its first message (or its error)
                next(answer)
                answer.cancel()
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
    return OK, ""


def _key(server: RunningServer, tenant: str, scopes: list[str], **kwargs: object) -> Target:
    with server.client() as client:
        created = client.create_key("caller", scopes, tenant_id=tenant, **kwargs)  # type: ignore[arg-type]
    return Target(created.key.id, created.secret)


def _target(server: RunningServer, tenant: str = TENANT) -> Target:
    return _key(server, tenant, ["passes:read"])


def _caller_key(server: RunningServer, kind: str) -> str | None:
    """A caller key of each kind that must be refused as UNAUTHENTICATED."""
    if kind == "absent":
        return None
    if kind == "empty":
        return ""
    if kind == "garbage":
        return "let-me-in"
    if kind == "bad-checksum":
        return server.admin_key[:-1] + ("A" if server.admin_key[-1] != "A" else "B")
    if kind == "other-environment":
        return KeyFormat("wc_live").generate()
    if kind == "unknown":
        return KeyFormat("ak").generate()
    if kind == "revoked":
        caller = _key(server, TENANT, list(ADMIN_SCOPES))
        with server.client() as client:
            client.revoke_key(caller.key_id, tenant_id=TENANT)
        return caller.secret
    if kind == "expired":
        expire = server.clock.now() + timedelta(minutes=1)
        caller = _key(server, TENANT, list(ADMIN_SCOPES), expire_time=expire)
        server.clock.advance(timedelta(minutes=1))
        return caller.secret
    raise AssertionError(kind)


class TestEveryRpc:
    def test_each_rpc_of_each_service_is_covered(self) -> None:
        """Every RPC in the service descriptors has a needed scope and a request here."""
        target = Target("key_x", "")
        assert set(RPCS) == set(NEEDED_SCOPE) == set(_requests(TENANT, target))


class TestUnauthenticated:
    @pytest.mark.parametrize(
        "kind",
        [
            "absent",
            "empty",
            "garbage",
            "bad-checksum",
            "other-environment",
            "unknown",
            "revoked",
            "expired",
        ],
    )
    def test_every_rpc_refuses_a_bad_caller_key(self, server: RunningServer, kind: str) -> None:
        """A missing, malformed, unknown, revoked or expired x-api-key: UNAUTHENTICATED on all."""
        target = _target(server)
        caller = _caller_key(server, kind)
        codes = {rpc: _call(server, rpc, caller, TENANT, target)[0] for rpc in RPCS}
        assert codes == dict.fromkeys(RPCS, grpc.StatusCode.UNAUTHENTICATED)

    def test_missing_key_message_says_what_to_send(self, server: RunningServer) -> None:
        """The UNAUTHENTICATED message for a missing caller key names the x-api-key metadata."""
        code, details = _call(server, "ListKeys", None, TENANT, _target(server))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "x-api-key" in details

    def test_authentication_comes_before_validation(self, server: RunningServer) -> None:
        """Without a caller key, even an invalid request answers UNAUTHENTICATED."""
        bogus = Target("not an id", "")
        codes = {rpc: _call(server, rpc, None, "!!bad tenant!!", bogus)[0] for rpc in RPCS}
        assert codes == dict.fromkeys(RPCS, grpc.StatusCode.UNAUTHENTICATED)

    def test_revoking_the_caller_key_takes_effect_on_the_next_call(
        self, server: RunningServer
    ) -> None:
        """A caller key that just worked is refused on the very next call after its revocation."""
        caller = _key(server, TENANT, list(ADMIN_SCOPES))
        target = _target(server)
        assert _call(server, "ListKeys", caller.secret, "", target)[0] == OK
        with server.client() as client:
            client.revoke_key(caller.key_id, tenant_id=TENANT)
        assert _call(server, "ListKeys", caller.secret, "", target)[0] == (
            grpc.StatusCode.UNAUTHENTICATED
        )


class TestReservedScopes:
    @pytest.mark.parametrize("rpc", RPCS)
    def test_caller_without_the_needed_scope_is_denied(
        self, server: RunningServer, rpc: str
    ) -> None:
        """A caller key with every reserved scope but the one an RPC needs: PERMISSION_DENIED."""
        target = _target(server)
        others = [s for s in ADMIN_SCOPES if s != NEEDED_SCOPE[rpc]] + ["passes:read"]
        caller = _key(server, TENANT, others)
        code, details = _call(server, rpc, caller.secret, "", target)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert NEEDED_SCOPE[rpc] in details

    @pytest.mark.parametrize("rpc", RPCS)
    def test_the_needed_scope_alone_suffices(self, server: RunningServer, rpc: str) -> None:
        """A caller key holding only the scope an RPC needs may make that call."""
        target = _target(server)
        caller = _key(server, TENANT, [NEEDED_SCOPE[rpc]])
        assert _call(server, rpc, caller.secret, "", target) == (OK, "")

    def test_business_scopes_grant_no_rpc(self, server: RunningServer) -> None:
        """A key with only non-reserved scopes may call nothing: PERMISSION_DENIED on each RPC."""
        target = _target(server)
        caller = _key(server, TENANT, ["passes:read", "passes:write", "customers:write"])
        codes = {rpc: _call(server, rpc, caller.secret, "", target)[0] for rpc in RPCS}
        assert codes == dict.fromkeys(RPCS, grpc.StatusCode.PERMISSION_DENIED)

    @pytest.mark.parametrize("rpc", KEY_ID_RPCS)
    def test_permission_is_checked_before_existence(self, server: RunningServer, rpc: str) -> None:
        """Without the scope, a key id that does not exist still answers PERMISSION_DENIED."""
        caller = _key(server, TENANT, ["passes:read"])
        missing = Target("key_doesnotexist", "")
        assert _call(server, rpc, caller.secret, "", missing)[0] == (
            grpc.StatusCode.PERMISSION_DENIED
        )


class TestTenantKeys:
    def test_empty_tenant_means_the_callers_own(self, server: RunningServer) -> None:
        """A tenant key with tenant_id empty creates, lists and verifies in its own tenant."""
        caller = _key(server, TENANT, list(ADMIN_SCOPES))
        with server.client(caller.secret) as client:
            created = client.create_key("svc", ["passes:read"])
            listed = {key.id for key in client.list_keys()}
            answer = client.verify(created.secret, ["passes:read"])
            fetched = client.get_key(created.key.id)
        assert created.key.tenant_id == TENANT
        assert listed == {caller.key_id, created.key.id}
        assert answer.code == key_verifier_pb2.VERIFY_CODE_VALID
        assert answer.tenant_id == TENANT
        assert fetched.tenant_id == TENANT

    @pytest.mark.parametrize("rpc", TENANT_RPCS)
    def test_naming_its_own_tenant_works(self, server: RunningServer, rpc: str) -> None:
        """A tenant key may also name its own tenant explicitly."""
        caller = _key(server, TENANT, list(ADMIN_SCOPES))
        assert _call(server, rpc, caller.secret, TENANT, _target(server)) == (OK, "")

    @pytest.mark.parametrize("rpc", TENANT_RPCS)
    def test_another_tenant_is_denied(self, server: RunningServer, rpc: str) -> None:
        """A tenant key naming another tenant: PERMISSION_DENIED, even for that tenant's own key."""
        caller = _key(server, TENANT, list(ADMIN_SCOPES))
        theirs = _target(server, OTHER)
        assert _call(server, rpc, caller.secret, OTHER, theirs)[0] == (
            grpc.StatusCode.PERMISSION_DENIED
        )

    @pytest.mark.parametrize("rpc", KEY_ID_RPCS)
    def test_another_tenants_key_id_is_not_found(self, server: RunningServer, rpc: str) -> None:
        """Another tenant's key id under the caller's tenant: NOT_FOUND; that key is untouched."""
        caller = _key(server, TENANT, list(ADMIN_SCOPES))
        theirs = _target(server, OTHER)
        assert _call(server, rpc, caller.secret, "", theirs)[0] == grpc.StatusCode.NOT_FOUND
        with server.client() as admin:
            key = admin.get_key(theirs.key_id, tenant_id=OTHER)
            answer = admin.verify(theirs.secret, tenant_id=OTHER)
        assert key.state == api_key_pb2.KEY_STATE_ACTIVE
        assert key.name == "caller"
        assert not key.replaced_by
        assert answer.code == key_verifier_pb2.VERIFY_CODE_VALID

    def test_verifying_another_tenants_key_is_not_found(self, server: RunningServer) -> None:
        """A tenant caller verifying another tenant's valid key gets NOT_FOUND, never VALID."""
        caller = _key(server, TENANT, [reserved.VERIFY])
        theirs = _target(server, OTHER)
        with server.client(caller.secret) as client:
            answer = client.verify(theirs.secret)
        assert answer.code == key_verifier_pb2.VERIFY_CODE_NOT_FOUND

    def test_cannot_act_on_the_platform_tenant(self, server: RunningServer) -> None:
        """A tenant key cannot create or list keys in the platform tenant."""
        caller = _key(server, TENANT, list(ADMIN_SCOPES))
        target = _target(server)
        for rpc in ("CreateKey", "ListKeys"):
            assert _call(server, rpc, caller.secret, "_platform", target)[0] == (
                grpc.StatusCode.PERMISSION_DENIED
            ), rpc

    def test_tenant_keys_cannot_grant_platform_power(self, server: RunningServer) -> None:
        """Keys a tenant key creates live in that tenant, so they never act on other tenants."""
        caller = _key(server, TENANT, list(ADMIN_SCOPES))
        with server.client(caller.secret) as client:
            minted = client.create_key("minted", list(ADMIN_SCOPES))
        assert minted.key.tenant_id == TENANT
        assert _call(server, "ListKeys", minted.secret, OTHER, _target(server))[0] == (
            grpc.StatusCode.PERMISSION_DENIED
        )


class TestPlatformKeys:
    @pytest.mark.parametrize("rpc", NAMED_TENANT_RPCS)
    def test_must_name_a_tenant(self, server: RunningServer, rpc: str) -> None:
        """A platform key with an empty tenant_id: INVALID_ARGUMENT saying tenant_id is required."""
        code, details = _call(server, rpc, server.admin_key, "", _target(server))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "tenant_id" in details

    @pytest.mark.parametrize("tenant", [TENANT, OTHER])
    @pytest.mark.parametrize("rpc", TENANT_RPCS)
    def test_acts_on_any_tenant(self, server: RunningServer, rpc: str, tenant: str) -> None:
        """A platform key may make every call on any tenant."""
        assert _call(server, rpc, server.admin_key, tenant, _target(server, tenant)) == (OK, "")

    def test_sees_each_tenant_separately(self, server: RunningServer) -> None:
        """A platform key lists each tenant's keys under that tenant only."""
        ours = _target(server, TENANT)
        theirs = _target(server, OTHER)
        with server.client() as client:
            assert {k.id for k in client.list_keys(tenant_id=TENANT)} == {ours.key_id}
            assert {k.id for k in client.list_keys(tenant_id=OTHER)} == {theirs.key_id}
            assert {k.id for k in client.list_keys(tenant_id="_platform")} == {server.admin_key_id}
