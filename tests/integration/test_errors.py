"""Errors on the wire: the status table, google.rpc details read by the Python client, requests
whose bytes do not decode, and several x-api-key values.
"""

import logging
import re
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_status import rpc_status

from apikeys.v1 import key_manager_pb2, key_verifier_pb2
from apikeys_client import (
    Aborted,
    AlreadyExists,
    ApiKeysClient,
    ApiKeysError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from apikeys_client._errors import from_rpc_error
from apikeys_server.domain import errors
from apikeys_server.domain.key_format import KeyFormat
from apikeys_server.rpc.errors import STATUS_OF, status_errors, stream_status_errors
from apikeys_server.rpc.registration import add_servicer
from tests.support import RunningServer

TENANT = "acme"
MANAGER = key_manager_pb2.DESCRIPTOR.services_by_name["KeyManager"]
VERIFIER = key_verifier_pb2.DESCRIPTOR.services_by_name["KeyVerifier"]
METHODS = [method for service in (MANAGER, VERIFIER) for method in service.methods]
UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")


# -- the status table, through a servicer that raises what a test tells it to ---------------


class SubclassOfNotFound(errors.NotFound):
    """A domain error the table does not name: it maps as its parent."""


@dataclass(frozen=True)
class Case:
    error: Exception
    code: grpc.StatusCode
    client_error: type[ApiKeysError]
    reason: str
    violations: tuple[tuple[str, str], ...] = ()


CASES = {
    "invalid-argument": Case(
        errors.InvalidArgument("bad scope", reason="SCOPE_NOT_IN_CATALOG", field="scopes[1]"),
        grpc.StatusCode.INVALID_ARGUMENT,
        InvalidArgument,
        "SCOPE_NOT_IN_CATALOG",
        (("scopes[1]", "bad scope"),),
    ),
    "unauthenticated": Case(
        errors.Unauthenticated("no key", reason="MISSING_CALLER_KEY"),
        grpc.StatusCode.UNAUTHENTICATED,
        Unauthenticated,
        "MISSING_CALLER_KEY",
    ),
    "permission-denied": Case(
        errors.PermissionDenied("lacks", reason="CALLER_LACKS_SCOPE"),
        grpc.StatusCode.PERMISSION_DENIED,
        PermissionDenied,
        "CALLER_LACKS_SCOPE",
    ),
    "not-found": Case(
        errors.NotFound("no key", reason="KEY_NOT_FOUND"),
        grpc.StatusCode.NOT_FOUND,
        NotFound,
        "KEY_NOT_FOUND",
    ),
    "already-exists": Case(
        errors.AlreadyExists("already created", reason="REQUEST_ALREADY_DONE"),
        grpc.StatusCode.ALREADY_EXISTS,
        AlreadyExists,
        "REQUEST_ALREADY_DONE",
    ),
    "failed-precondition": Case(
        errors.FailedPrecondition("revoked", reason="KEY_REVOKED"),
        grpc.StatusCode.FAILED_PRECONDITION,
        FailedPrecondition,
        "KEY_REVOKED",
    ),
    "aborted": Case(
        errors.Aborted("the change conflicts with a concurrent one; retry"),
        grpc.StatusCode.ABORTED,
        Aborted,
        "CONFLICT",
    ),
    "resource-exhausted": Case(
        errors.ResourceExhausted("too many", reason="TOO_MANY_WATCHES"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ResourceExhausted,
        "TOO_MANY_WATCHES",
    ),
    "unavailable": Case(
        errors.Unavailable("down", reason="DATABASE_UNAVAILABLE"),
        grpc.StatusCode.UNAVAILABLE,
        Unavailable,
        "DATABASE_UNAVAILABLE",
    ),
    "unmapped-subclass": Case(
        SubclassOfNotFound("gone"), grpc.StatusCode.NOT_FOUND, NotFound, "NOT_FOUND"
    ),
    "bare-domain-error": Case(
        errors.DomainError("refused"),
        grpc.StatusCode.FAILED_PRECONDITION,
        FailedPrecondition,
        "REFUSED",
    ),
    "not-a-domain-error": Case(
        RuntimeError("secret detail"), grpc.StatusCode.INTERNAL, ApiKeysError, "INTERNAL"
    ),
}


class RaisingVerifier:
    """Answers every call with ``error``; the stream sends one message first."""

    error: Exception = RuntimeError("unset")

    @status_errors
    def Verify(
        self, request: key_verifier_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> key_verifier_pb2.VerifyResponse:
        raise self.error

    @stream_status_errors
    def WatchKeyChanges(
        self, request: key_verifier_pb2.WatchKeyChangesRequest, context: grpc.ServicerContext
    ) -> Iterator[key_verifier_pb2.WatchKeyChangesResponse]:
        yield key_verifier_pb2.WatchKeyChangesResponse()
        raise self.error


@pytest.fixture(scope="module")
def raising() -> Iterator[tuple[RaisingVerifier, str]]:
    servicer = RaisingVerifier()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_servicer(server, VERIFIER, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def _check(raised: ApiKeysError, case: Case) -> None:
    assert type(raised) is case.client_error
    assert raised.code == case.code
    assert raised.reason == case.reason
    assert raised.domain == "apikeys"
    assert raised.field_violations == list(case.violations)


class TestStatusTable:
    def test_every_code_of_the_table_is_tested(self) -> None:
        """Each status code the table (or the fallback) produces has a case below."""
        assert {case.code for case in CASES.values()} == {
            *STATUS_OF.values(),
            grpc.StatusCode.INTERNAL,
        }

    @pytest.mark.parametrize("name", list(CASES))
    def test_unary(self, raising: tuple[RaisingVerifier, str], name: str) -> None:
        """A unary call ends with the mapped code, the message, ErrorInfo and BadRequest."""
        servicer, target = raising
        case = CASES[name]
        servicer.error = case.error
        with ApiKeysClient(target, "any", timeout=5) as client, pytest.raises(ApiKeysError) as e:
            client.verify("k")
        _check(e.value, case)
        if case.code is not grpc.StatusCode.INTERNAL:
            assert e.value.details == str(case.error)

    @pytest.mark.parametrize("name", list(CASES))
    def test_stream(self, raising: tuple[RaisingVerifier, str], name: str) -> None:
        """An error while a stream runs maps as in a unary call, details included."""
        servicer, target = raising
        case = CASES[name]
        servicer.error = case.error
        with ApiKeysClient(target, "any", timeout=5) as client:
            stream = client.watch_key_changes(timeout=5)
            next(stream)
            with pytest.raises(ApiKeysError) as e:
                next(stream)
        _check(e.value, case)

    def test_unexpected_errors_are_logged_not_shown(
        self, raising: tuple[RaisingVerifier, str], caplog: pytest.LogCaptureFixture
    ) -> None:
        """A non-domain error: INTERNAL, a generic message, its traceback only in the log."""
        servicer, target = raising
        servicer.error = RuntimeError("secret detail")
        with (
            caplog.at_level(logging.ERROR, "apikeys_server.rpc.errors"),
            ApiKeysClient(target, "any", timeout=5) as client,
            pytest.raises(ApiKeysError) as e,
        ):
            client.verify("k")
        assert "secret detail" not in e.value.details
        assert e.value.details == "internal error; see the server log"
        [record] = caplog.records
        assert record.exc_info is not None and "secret detail" in str(record.exc_info[1])


# -- reasons and details from the real service ------------------------------------------------


def _raised(call: object) -> ApiKeysError:
    try:
        if callable(call):
            call()
    except ApiKeysError as error:
        return error
    except grpc.RpcError as error:
        return from_rpc_error(error)
    raise AssertionError("the call succeeded")


class TestReasons:
    def test_unknown_scope_names_its_position(self, server: RunningServer) -> None:
        """CreateKey with an unknown second scope: SCOPE_NOT_IN_CATALOG on field scopes[1]."""
        with server.client() as client:
            error = _raised(
                lambda: client.create_key("svc", ["passes:read", "passes:wirte"], tenant_id=TENANT)
            )
        assert isinstance(error, InvalidArgument)
        assert (error.reason, error.domain) == ("SCOPE_NOT_IN_CATALOG", "apikeys")
        assert error.field_violations == [("scopes[1]", error.details)]
        assert "passes:wirte" in error.details

    def test_required_scope_and_tenant_fields(self, server: RunningServer) -> None:
        """Verify names required_scopes[i]; a platform key without tenant_id names tenant_id."""
        with server.client() as client:
            unknown = _raised(
                lambda: client.verify("k", ["passes:read", "nope:x"], tenant_id=TENANT)
            )
            no_tenant = _raised(lambda: client.verify("k"))
        assert unknown.reason == "SCOPE_NOT_IN_CATALOG"
        assert [f for f, _ in unknown.field_violations] == ["required_scopes[1]"]
        assert (no_tenant.reason, no_tenant.field_violations[0][0]) == (
            "TENANT_REQUIRED",
            "tenant_id",
        )

    def test_update_mask_path_is_named(self, server: RunningServer) -> None:
        """An update_mask path that cannot be updated: field update_mask.paths[1]."""
        with server.client() as client:
            key = client.create_key("svc", ["passes:read"], tenant_id=TENANT).key
        request = key_manager_pb2.UpdateKeyRequest(
            tenant_id=TENANT, key_id=key.id, update_mask=FieldMask(paths=["name", "state"])
        )
        with server.channel() as channel:
            manager, _ = server.stubs(channel)
            error = _raised(
                lambda: manager.UpdateKey(request, metadata=(("x-api-key", server.admin_key),))
            )
        assert error.reason == "UPDATE_MASK_PATH_NOT_UPDATABLE"
        assert [f for f, _ in error.field_violations] == ["update_mask.paths[1]"]

    def test_key_state_and_existence(self, server: RunningServer) -> None:
        """Unknown key id: KEY_NOT_FOUND; rotating a revoked key: KEY_REVOKED; no field."""
        with server.client() as client:
            key = client.create_key("svc", ["passes:read"], tenant_id=TENANT).key
            client.revoke_key(key.id, tenant_id=TENANT)
            missing = _raised(lambda: client.get_key("key_unknown", tenant_id=TENANT))
            revoked = _raised(lambda: client.rotate_key(key.id, timedelta(0), tenant_id=TENANT))
        assert (type(missing), missing.reason, missing.field_violations) == (
            NotFound,
            "KEY_NOT_FOUND",
            [],
        )
        assert (type(revoked), revoked.reason) == (FailedPrecondition, "KEY_REVOKED")

    def test_caller_reasons(self, server: RunningServer) -> None:
        """Unknown caller key, missing scope, another tenant: each with its own reason."""
        with server.client() as admin:
            weak = admin.create_key("weak", ["passes:read"], tenant_id=TENANT).secret
            tenant_admin = admin.create_key(
                "tenant-admin", ["apikeys:read"], tenant_id=TENANT
            ).secret
        with server.client(KeyFormat("ak").generate()) as client:
            unknown = _raised(client.list_scopes)
        with server.client(weak) as client:
            lacking = _raised(client.list_scopes)
        with server.client(tenant_admin) as client:
            other = _raised(lambda: list(client.list_keys(tenant_id="globex")))
        assert (type(unknown), unknown.reason) == (Unauthenticated, "CALLER_KEY_NOT_KNOWN")
        assert (type(lacking), lacking.reason) == (PermissionDenied, "CALLER_LACKS_SCOPE")
        assert (type(other), other.reason) == (PermissionDenied, "TENANT_MISMATCH")

    def test_stream_errors_carry_details(self, server: RunningServer) -> None:
        """WatchKeyChanges with a negative after_position: details through the stream too."""
        with server.client() as client:
            error = _raised(lambda: next(client.watch_key_changes(-1, tenant_id=TENANT)))
        assert isinstance(error, InvalidArgument)
        assert error.reason == "NEGATIVE_AFTER_POSITION"
        assert [f for f, _ in error.field_violations] == ["after_position"]

    def test_reasons_are_upper_snake_case(self) -> None:
        """Every default reason is UPPER_SNAKE_CASE."""
        classes = [errors.DomainError, *errors.DomainError.__subclasses__()]
        assert all(UPPER_SNAKE.fullmatch(cls.default_reason) for cls in classes)


# -- several x-api-key values -----------------------------------------------------------------


class TestDuplicateCallerKey:
    @pytest.mark.parametrize("order", ["valid-first", "bogus-first", "both-valid"])
    def test_several_values_are_refused(self, server: RunningServer, order: str) -> None:
        """Two x-api-key values answer UNAUTHENTICATED, even when one (or both) is valid."""
        bogus = KeyFormat("ak").generate()
        values = {
            "valid-first": (server.admin_key, bogus),
            "bogus-first": (bogus, server.admin_key),
            "both-valid": (server.admin_key, server.admin_key),
        }[order]
        metadata = tuple(("x-api-key", value) for value in values)
        request = key_verifier_pb2.VerifyRequest(key=bogus, tenant_id=TENANT)
        with server.channel() as channel:
            _, verifier = server.stubs(channel)
            with pytest.raises(grpc.RpcError) as raised:
                verifier.Verify(request, metadata=metadata, timeout=10)
        error = from_rpc_error(raised.value)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert "send exactly one x-api-key" in error.details
        assert error.reason == "DUPLICATE_CALLER_KEY"


# -- bytes that are not the request message ---------------------------------------------------


def _first_string_field(method: MethodDescriptor) -> FieldDescriptor | None:
    for field in method.input_type.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            return field
    return None


def _bad_bytes() -> Iterator[object]:
    for method in METHODS:
        string_field = _first_string_field(method)
        if string_field is not None:
            tag = bytes([(string_field.number << 3) | 2])
            yield pytest.param(method, tag + b"\x02\xff\xfe", id=f"{method.name}-bad-utf8")
        # Wire type 7 does not exist; an end-group tag with no group; a length past the end.
        yield pytest.param(method, b"\x0f", id=f"{method.name}-no-such-wire-type")
        yield pytest.param(method, b"\x0c", id=f"{method.name}-stray-end-group")
        yield pytest.param(method, b"\x0a\x05ab", id=f"{method.name}-truncated")
        yield pytest.param(method, b"\xff\xff\xff\xff", id=f"{method.name}-garbage")


class TestUndecodableRequests:
    @pytest.mark.parametrize(("method", "data"), list(_bad_bytes()))
    def test_answers_invalid_argument(
        self, server: RunningServer, method: MethodDescriptor, data: bytes
    ) -> None:
        """Raw bytes that do not decode: INVALID_ARGUMENT naming the message, never INTERNAL."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        metadata = (("x-api-key", server.admin_key),)
        with server.channel() as channel, pytest.raises(grpc.RpcError) as raised:
            if method.server_streaming:
                stream = channel.unary_stream(path)
                next(stream(data, metadata=metadata, timeout=10))
            else:
                channel.unary_unary(path)(data, metadata=metadata, timeout=10)
        call = raised.value
        assert isinstance(call, grpc.Call)
        assert call.code() == grpc.StatusCode.INVALID_ARGUMENT, call.details()
        expected = f"the request could not be decoded as {method.input_type.full_name}: "
        assert (call.details() or "").startswith(expected)
        status = rpc_status.from_call(call)
        assert status is not None
        assert from_rpc_error(call).reason == "REQUEST_NOT_DECODABLE"

    def test_reflection_still_lists_the_services(self, server: RunningServer) -> None:
        """Services registered from descriptors are still listed by server reflection."""
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        with server.channel() as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            [answer] = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        names = {service.name for service in answer.list_services_response.service}
        assert {MANAGER.full_name, VERIFIER.full_name} <= names
