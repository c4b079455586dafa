"""The servicers through grpc_testing: transport rules without a network, over a real SQLite file.

These pin what the thin rpc/ layer owns: reading the caller key from metadata, converting
requests and answers, and mapping domain errors to status codes in one place.
"""

from collections.abc import Iterator
from typing import Any

import grpc
import grpc_testing
import pytest

from apikeys.v1 import key_manager_pb2, key_verifier_pb2
from apikeys_server.app import Services, build_services
from apikeys_server.domain.validation import PLATFORM_TENANT
from apikeys_server.rpc.key_manager import KeyManagerServicer
from apikeys_server.rpc.key_verifier import KeyVerifierServicer
from tests.support import ADMIN_SCOPES, FakeClock, server_settings

MANAGER = key_manager_pb2.DESCRIPTOR.services_by_name["KeyManager"]
VERIFIER = key_verifier_pb2.DESCRIPTOR.services_by_name["KeyVerifier"]


class Harness:
    def __init__(self, services: Services, clock: FakeClock, admin_key: str) -> None:
        self.admin_key = admin_key
        self.server = grpc_testing.server_from_dictionary(
            {
                MANAGER: KeyManagerServicer(services.manager, services.verifier, clock),
                VERIFIER: KeyVerifierServicer(services.verifier, services.changes, 2),
            },
            grpc_testing.strict_real_time(),
        )

    def call(
        self, service: Any, method: str, request: Any, api_key: str | None = None
    ) -> tuple[Any, grpc.StatusCode, str]:
        metadata = () if api_key is None else (("x-api-key", api_key),)
        rpc = self.server.invoke_unary_unary(
            service.methods_by_name[method], metadata, request, timeout=5
        )
        response, _trailing, code, details = rpc.termination()
        return response, code, details


@pytest.fixture
def harness(sqlite_url: str) -> Iterator[Harness]:
    clock = FakeClock()
    services = build_services(server_settings(sqlite_url), clock)
    admin = services.manager.create_unchecked(PLATFORM_TENANT, "admin", ADMIN_SCOPES, None)
    try:
        yield Harness(services, clock, admin.secret)
    finally:
        services.close()


class TestServicers:
    def test_caller_key_is_read_from_metadata(self, harness: Harness) -> None:
        """Without x-api-key metadata every RPC ends UNAUTHENTICATED before doing anything."""
        request = key_manager_pb2.ListScopesRequest()
        _, code, details = harness.call(MANAGER, "ListScopes", request)
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert "x-api-key" in details

    def test_domain_errors_map_to_status_codes(self, harness: Harness) -> None:
        """An unknown scope is INVALID_ARGUMENT naming it; an unknown key id is NOT_FOUND."""
        create = key_manager_pb2.CreateKeyRequest(
            tenant_id="acme", name="crm-sync-prod", scopes=["passes:wirte"]
        )
        _, code, details = harness.call(MANAGER, "CreateKey", create, harness.admin_key)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "passes:wirte" in details
        get = key_manager_pb2.GetKeyRequest(tenant_id="acme", key_id="key_unknown")
        _, code, _ = harness.call(MANAGER, "GetKey", get, harness.admin_key)
        assert code is grpc.StatusCode.NOT_FOUND

    def test_create_then_verify_round_trip(self, harness: Harness) -> None:
        """CreateKey's secret verifies VALID (200); a scope it lacks is INSUFFICIENT_SCOPE (403)."""
        create = key_manager_pb2.CreateKeyRequest(
            tenant_id="acme", name="crm-sync-prod", scopes=["passes:read"]
        )
        created, code, _ = harness.call(MANAGER, "CreateKey", create, harness.admin_key)
        assert code is grpc.StatusCode.OK
        verify = key_verifier_pb2.VerifyRequest(
            key=created.secret, tenant_id="acme", required_scopes=["passes:read"]
        )
        answer, code, _ = harness.call(VERIFIER, "Verify", verify, harness.admin_key)
        assert code is grpc.StatusCode.OK
        assert (answer.code, answer.http_status) == (key_verifier_pb2.VERIFY_CODE_VALID, 200)
        verify.required_scopes.append("passes:write")
        answer, _, _ = harness.call(VERIFIER, "Verify", verify, harness.admin_key)
        assert answer.http_status == 403
        assert list(answer.missing_scopes) == ["passes:write"]

    def test_refused_key_is_an_ok_answer(self, harness: Harness) -> None:
        """A malformed key is an OK call with valid=false and 401, not a gRPC error."""
        verify = key_verifier_pb2.VerifyRequest(key="ak_nope", tenant_id="acme")
        answer, code, _ = harness.call(VERIFIER, "Verify", verify, harness.admin_key)
        assert code is grpc.StatusCode.OK
        assert not answer.valid
        assert answer.code == key_verifier_pb2.VERIFY_CODE_MALFORMED
        assert answer.http_status == 401
