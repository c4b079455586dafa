"""Envoy's Authorization/Check: each decision and the header rules, through grpc_testing over a
real SQLite file (the servicer alone), then once over a real server (its registration)."""

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import grpc
import grpc_testing
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from apikeys_server.app import Services, build_services
from apikeys_server.domain.key_format import KeyFormat
from apikeys_server.domain.validation import PLATFORM_TENANT
from apikeys_server.rpc.ext_authz import ExtAuthzServicer
from tests.support import ADMIN_SCOPES, FakeClock, running_server, server_settings

AUTHORIZATION = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
CHECK = AUTHORIZATION.methods_by_name["Check"]


def check_request(
    headers: dict[str, str] | None = None,
    raw: list[tuple[str, bytes]] | None = None,
    **extensions: str,
) -> Any:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", "/passes"
    http.headers.update(headers or {})
    for name, value in raw or []:
        http.header_map.headers.add(key=name, raw_value=value)
    request.attributes.context_extensions.update(extensions)
    return request


class Harness:
    def __init__(self, services: Services, clock: FakeClock, **options: Any) -> None:
        self.services = services
        self.clock = clock
        envoy = services.manager.create_unchecked(
            PLATFORM_TENANT, "envoy", ["apikeys:verify"], None
        )
        admin = services.manager.create_unchecked(PLATFORM_TENANT, "admin", ADMIN_SCOPES, None)
        self.envoy_key = envoy.secret
        self.admin = services.verifier.authenticate(admin.secret)
        servicer = ExtAuthzServicer(
            services.verifier,
            options.get("key_header", "x-api-key"),
            options.get("keep_key_header", False),
        )
        self.server = grpc_testing.server_from_dictionary(
            {AUTHORIZATION: servicer}, grpc_testing.strict_real_time()
        )

    def key(self, scopes: list[str], tenant: str = "acme", **kwargs: Any) -> Any:
        return self.services.manager.create_unchecked(tenant, "crm", scopes, kwargs.get("expire"))

    def check(self, request: Any, caller: str | None = "envoy") -> tuple[Any, grpc.StatusCode, str]:
        key = self.envoy_key if caller == "envoy" else caller
        metadata = () if key is None else (("x-api-key", key),)
        rpc = self.server.invoke_unary_unary(CHECK, metadata, request, timeout=5)
        response, _trailing, code, details = rpc.termination()
        return response, code, details


@pytest.fixture
def services(sqlite_url: str, clock: FakeClock) -> Iterator[Services]:
    services = build_services(server_settings(sqlite_url), clock)
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def harness(services: Services, clock: FakeClock) -> Harness:
    return Harness(services, clock)


def headers_of(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


def assert_denied(response: Any, status: int, code: str) -> dict[str, Any]:
    """A denial with the HTTP status, WWW-Authenticate, JSON content type and the code."""
    assert response.status.code != code_pb2.OK
    denied = response.denied_response
    assert denied.status.code == status
    headers = headers_of(denied.headers)
    assert headers["www-authenticate"] == "ApiKey"
    assert headers["content-type"] == "application/json"
    body: dict[str, Any] = json.loads(denied.body)
    assert body["code"] == code
    assert body["message"]
    return body


ACME_READ = {"tenant_id": "acme", "required_scopes": "passes:read"}


class TestDecisions:
    def test_valid_key_is_ok_with_identity_headers_and_key_removed(self, harness: Harness) -> None:
        issued = harness.key(["passes:read", "customers:read"])
        response, code, _ = harness.check(check_request({"x-api-key": issued.secret}, **ACME_READ))
        assert code is grpc.StatusCode.OK
        assert response.status.code == code_pb2.OK
        ok = response.ok_response
        assert headers_of(ok.headers) == {
            "x-apikeys-key-id": issued.key.id,
            "x-apikeys-tenant-id": "acme",
            "x-apikeys-scopes": "customers:read passes:read",
        }
        for option in ok.headers:
            # Overwrite what a client sent under these names, never append to it.
            assert option.append_action == option.OVERWRITE_IF_EXISTS_OR_ADD
            assert not option.HasField("append")
        assert list(ok.headers_to_remove) == ["x-api-key"]

    def test_keep_key_header_and_custom_header_name(self, services: Services) -> None:
        harness = Harness(services, FakeClock(), key_header="X-Gateway-Key", keep_key_header=True)
        issued = harness.key(["passes:read"])
        request = check_request({"x-gateway-key": issued.secret}, **ACME_READ)
        response, _, _ = harness.check(request)
        assert response.status.code == code_pb2.OK
        assert list(response.ok_response.headers_to_remove) == []
        # The default header is then just another header.
        response, _, _ = harness.check(check_request({"x-api-key": issued.secret}, **ACME_READ))
        body = assert_denied(response, 401, "missing")
        assert "x-gateway-key" in body["message"]

    def test_missing_scope_is_403_naming_it(self, harness: Harness) -> None:
        issued = harness.key(["passes:read"])
        request = check_request(
            {"x-api-key": issued.secret},
            tenant_id="acme",
            required_scopes="passes:read passes:write customers:read",
        )
        response, code, _ = harness.check(request)
        assert code is grpc.StatusCode.OK
        body = assert_denied(response, 403, "insufficient_scope")
        assert body["missing_scopes"] == ["customers:read", "passes:write"]
        assert "customers:read passes:write" in body["message"]
        assert issued.secret not in response.denied_response.body

    @pytest.mark.parametrize(
        ("headers", "code"),
        [
            ({}, "missing"),
            ({"x-api-key": ""}, "missing"),
            ({"x-api-key": "ak_nope"}, "malformed"),
            ({"x-api-key": "ak_" + "A" * 100_000}, "malformed"),
            ({"x-api-key": "ak_é\u0000\r\nX-Evil: 1"}, "malformed"),
            ({"authorization": "ApiKey whatever"}, "missing"),
        ],
        ids=["absent", "empty", "short", "over-long", "non-ascii-and-control", "other-header"],
    )
    def test_bad_keys_are_401(self, harness: Harness, headers: dict[str, str], code: str) -> None:
        response, status, _ = harness.check(check_request(headers, **ACME_READ))
        assert status is grpc.StatusCode.OK
        assert_denied(response, 401, code)
        for value in headers.values():
            if value:
                assert value not in response.denied_response.body

    def test_unknown_other_tenant_revoked_expired_are_401(self, harness: Harness) -> None:
        other = harness.key(["passes:read"], tenant="globex")
        revoked = harness.key(["passes:read"])
        expiring = harness.key(["passes:read"], expire=harness.clock.now() + timedelta(hours=1))
        harness.services.manager.revoke(harness.admin, "acme", revoked.key.id, "leaked")
        harness.clock.advance(timedelta(hours=2))
        unknown = KeyFormat("ak").generate()  # well-formed, never stored
        cases = [(unknown, "not_found"), (other.secret, "not_found"), (revoked.secret, "revoked")]
        cases += [(expiring.secret, "expired")]
        for secret, expected in cases:
            response, _, _ = harness.check(check_request({"x-api-key": secret}, **ACME_READ))
            assert_denied(response, 401, expected)
            assert secret not in response.denied_response.body

    def test_raw_header_bytes_several_copies(self, harness: Harness) -> None:
        """Envoy's encode_raw_headers: bytes that are not ASCII, or two copies, are malformed;
        one good copy passes."""
        issued = harness.key(["passes:read"])
        good = issued.secret.encode()
        for raw in (
            [("x-api-key", b"\xff\xfe" + good)],
            [("x-api-key", good), ("x-api-key", good)],
            [("x-api-key", good + b"," + good)],
        ):
            response, _, _ = harness.check(check_request(raw=raw, **ACME_READ))
            assert_denied(response, 401, "malformed")
        response, _, _ = harness.check(check_request(raw=[("x-api-key", good)], **ACME_READ))
        assert response.status.code == code_pb2.OK


class TestCallerAndRoute:
    def test_without_envoy_key_check_is_unauthenticated(self, harness: Harness) -> None:
        issued = harness.key(["passes:read"])
        request = check_request({"x-api-key": issued.secret}, **ACME_READ)
        _, code, details = harness.check(request, caller=None)
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert "x-api-key" in details
        # The presented key itself is no credential for calling the service.
        _, code, _ = harness.check(request, caller=issued.secret)
        assert code is grpc.StatusCode.PERMISSION_DENIED

    @pytest.mark.parametrize(
        ("extensions", "named"),
        [
            ({"required_scopes": "passes:read"}, "tenant_id"),
            ({"tenant_id": "acme", "required_scopes": "passes:raed"}, "passes:raed"),
        ],
        ids=["no-tenant", "scope-not-in-catalog"],
    )
    def test_misconfigured_route_is_invalid_argument_logged_once(
        self,
        harness: Harness,
        caplog: pytest.LogCaptureFixture,
        extensions: dict[str, str],
        named: str,
    ) -> None:
        issued = harness.key(["passes:read"])
        request = check_request({"x-api-key": issued.secret}, **extensions)
        with caplog.at_level(logging.ERROR, logger="apikeys_server.rpc.ext_authz"):
            for _ in range(3):
                _, code, details = harness.check(request)
                assert code is grpc.StatusCode.INVALID_ARGUMENT
                assert named in details and "context_extensions" in details
        logged = [record for record in caplog.records if named in record.getMessage()]
        assert len(logged) == 1
        assert issued.secret not in caplog.text


def test_real_server_serves_check(sqlite_url: str) -> None:
    """Registered in app.py on the gRPC address, beside KeyVerifier."""
    with running_server(server_settings(sqlite_url)) as server:
        manager = server.app.services.manager
        issued = manager.create_unchecked("acme", "crm", ["passes:read"], None)
        stub = external_auth_pb2_grpc.AuthorizationStub(server.channel())
        request = check_request({"x-api-key": issued.secret}, **ACME_READ)
        response = stub.Check(request, metadata=(("x-api-key", server.admin_key),), timeout=5)
        assert response.status.code == code_pb2.OK
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(request, timeout=5)
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
