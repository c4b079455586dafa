"""grpcurl against a real server process, through server reflection only (no .proto files)."""

import json
import subprocess
import uuid
from typing import Any

import pytest

from tests.e2e.conftest import ServerProcess, grpcurl_path

pytestmark = pytest.mark.e2e

CREATE = "apikeys.v1.KeyManager/CreateKey"
REVOKE = "apikeys.v1.KeyManager/RevokeKey"
VERIFY = "apikeys.v1.KeyVerifier/Verify"


def grpcurl(
    server: ServerProcess, *args: str, key: str | None = None, data: Any = None
) -> subprocess.CompletedProcess[str]:
    command = [str(grpcurl_path()), "-plaintext", "-max-time", "10"]
    if key is not None:
        command += ["-H", f"x-api-key: {key}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run(
        [*command, server.target, *args], capture_output=True, text=True, timeout=30, check=False
    )


def call(server: ServerProcess, method: str, data: Any, key: str | None = None) -> Any:
    """A unary call that must succeed; returns the response as JSON."""
    result = grpcurl(server, method, key=key or server.admin_key, data=data)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def create(server: ServerProcess, tenant: str, scopes: list[str], name: str = "crm-sync-prod"):
    created = call(server, CREATE, {"tenant_id": tenant, "name": name, "scopes": scopes})
    server.remember(created["secret"])
    return created


def verify(server: ServerProcess, key: str, tenant: str, scopes: list[str]) -> Any:
    return call(server, VERIFY, {"key": key, "tenant_id": tenant, "required_scopes": scopes})


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


class TestReflection:
    def test_list_shows_the_services(self, e2e_server: ServerProcess) -> None:
        """`grpcurl list` names KeyManager, KeyVerifier and the health service."""
        result = grpcurl(e2e_server, "list")
        assert result.returncode == 0, result.stderr
        services = result.stdout.split()
        for name in ("apikeys.v1.KeyManager", "apikeys.v1.KeyVerifier", "grpc.health.v1.Health"):
            assert name in services

    def test_list_methods_of_key_manager(self, e2e_server: ServerProcess) -> None:
        """`grpcurl list apikeys.v1.KeyManager` shows every management method."""
        result = grpcurl(e2e_server, "list", "apikeys.v1.KeyManager")
        assert result.returncode == 0, result.stderr
        methods = set(result.stdout.split())
        expected = {"CreateKey", "GetKey", "ListKeys", "UpdateKey", "RotateKey", "RevokeKey"}
        assert {f"apikeys.v1.KeyManager.{m}" for m in expected} <= methods

    def test_describe_verify_method(self, e2e_server: ServerProcess) -> None:
        """`grpcurl describe apikeys.v1.KeyVerifier.Verify` resolves the method by reflection."""
        result = grpcurl(e2e_server, "describe", "apikeys.v1.KeyVerifier.Verify")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "is a method" in result.stdout
        assert "rpc Verify ( .apikeys.v1.VerifyRequest )" in result.stdout
        assert "returns ( .apikeys.v1.VerifyResponse )" in result.stdout

    def test_describe_unknown_method_is_not_found(self, e2e_server: ServerProcess) -> None:
        """A method name the service does not have is still reported as not found."""
        result = grpcurl(e2e_server, "describe", "apikeys.v1.KeyVerifier.Nope")
        assert result.returncode != 0
        assert "Symbol not found" in result.stdout + result.stderr

    def test_describe_verify_response(self, e2e_server: ServerProcess) -> None:
        """The response message is described with its code and http_status fields."""
        result = grpcurl(e2e_server, "describe", "apikeys.v1.VerifyResponse")
        assert result.returncode == 0, result.stderr
        assert ".apikeys.v1.VerifyCode code = 2;" in result.stdout
        assert "int32 http_status = 3;" in result.stdout


class TestKeyLifecycle:
    def test_create_returns_key_and_secret(self, e2e_server: ServerProcess, tenant: str) -> None:
        """CreateKey from JSON returns the key (with hint, never the secret) and the secret."""
        created = create(e2e_server, tenant, ["passes:read"])
        key, secret = created["key"], created["secret"]
        assert key["id"].startswith("key_")
        assert key["tenant_id"] == tenant
        assert key["state"] == "KEY_STATE_ACTIVE"
        assert secret.startswith("ak_")
        shown = key["hint"].rstrip("…")
        assert secret.startswith(shown)
        assert len(shown) < len(secret) - 30
        assert secret not in json.dumps(key)

    def test_verify_valid_is_200(self, e2e_server: ServerProcess, tenant: str) -> None:
        """A fresh key with the needed scope verifies: VERIFY_CODE_VALID, http_status 200."""
        created = create(e2e_server, tenant, ["passes:read", "customers:read"])
        answer = verify(e2e_server, created["secret"], tenant, ["passes:read"])
        assert answer["valid"] is True
        assert answer["code"] == "VERIFY_CODE_VALID"
        assert answer["http_status"] == 200
        assert answer["key_id"] == created["key"]["id"]
        assert answer["tenant_id"] == tenant
        assert sorted(answer["scopes"]) == ["customers:read", "passes:read"]

    def test_verify_malformed_key_is_401(self, e2e_server: ServerProcess, tenant: str) -> None:
        """A key with a wrong checksum is VERIFY_CODE_MALFORMED, 401, as an OK answer."""
        secret = create(e2e_server, tenant, ["passes:read"])["secret"]
        last = "A" if secret[-1] != "A" else "B"
        answer = verify(e2e_server, secret[:-1] + last, tenant, ["passes:read"])
        assert answer.get("valid", False) is False
        assert answer["code"] == "VERIFY_CODE_MALFORMED"
        assert answer["http_status"] == 401

    def test_verify_other_tenant_is_401_not_found(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """A real key verified for another tenant is VERIFY_CODE_NOT_FOUND, 401."""
        secret = create(e2e_server, tenant, ["passes:read"])["secret"]
        answer = verify(e2e_server, secret, tenant + "-other", ["passes:read"])
        assert answer["code"] == "VERIFY_CODE_NOT_FOUND"
        assert answer["http_status"] == 401
        assert "key_id" not in answer

    def test_verify_missing_scope_is_403(self, e2e_server: ServerProcess, tenant: str) -> None:
        """A key without a required scope is VERIFY_CODE_INSUFFICIENT_SCOPE, 403, naming it."""
        secret = create(e2e_server, tenant, ["passes:read"])["secret"]
        answer = verify(e2e_server, secret, tenant, ["passes:read", "passes:write"])
        assert answer.get("valid", False) is False
        assert answer["code"] == "VERIFY_CODE_INSUFFICIENT_SCOPE"
        assert answer["http_status"] == 403
        assert answer["missing_scopes"] == ["passes:write"]

    def test_revoke_then_verify_is_revoked(self, e2e_server: ServerProcess, tenant: str) -> None:
        """Right after RevokeKey returns, Verify answers VERIFY_CODE_REVOKED, 401."""
        created = create(e2e_server, tenant, ["passes:read"])
        secret, key_id = created["secret"], created["key"]["id"]
        assert verify(e2e_server, secret, tenant, ["passes:read"])["code"] == "VERIFY_CODE_VALID"
        revoked = call(
            e2e_server, REVOKE, {"tenant_id": tenant, "key_id": key_id, "reason": "leaked"}
        )
        assert revoked["state"] == "KEY_STATE_REVOKED"
        answer = verify(e2e_server, secret, tenant, ["passes:read"])
        assert answer["code"] == "VERIFY_CODE_REVOKED"
        assert answer["http_status"] == 401


class TestErrors:
    def test_missing_api_key_is_unauthenticated(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """Without x-api-key, grpcurl exits non-zero and reports Unauthenticated."""
        result = grpcurl(
            e2e_server, CREATE, data={"tenant_id": tenant, "name": "n", "scopes": ["passes:read"]}
        )
        assert result.returncode != 0
        assert "Unauthenticated" in result.stdout + result.stderr

    def test_verify_without_api_key_is_unauthenticated(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """Verify also needs the caller's key: without it, Unauthenticated."""
        result = grpcurl(e2e_server, VERIFY, data={"key": "ak_x", "tenant_id": tenant})
        assert result.returncode != 0
        assert "Unauthenticated" in result.stdout + result.stderr

    def test_bad_name_is_invalid_argument(self, e2e_server: ServerProcess, tenant: str) -> None:
        """A key name with spaces is rejected with InvalidArgument and a message saying why."""
        result = grpcurl(
            e2e_server,
            CREATE,
            key=e2e_server.admin_key,
            data={"tenant_id": tenant, "name": "bad name!", "scopes": ["passes:read"]},
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "InvalidArgument" in output
        assert "name" in output

    def test_unknown_scope_is_invalid_argument(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """An unknown scope is rejected with InvalidArgument naming that scope."""
        result = grpcurl(
            e2e_server,
            CREATE,
            key=e2e_server.admin_key,
            data={"tenant_id": tenant, "name": "svc", "scopes": ["passes:wirte"]},
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "InvalidArgument" in output
        assert "passes:wirte" in output

    def test_key_without_manage_scope_is_permission_denied(
        self, e2e_server: ServerProcess, tenant: str
    ) -> None:
        """A valid caller key lacking apikeys:manage cannot create keys: PermissionDenied."""
        reader = create(e2e_server, tenant, ["apikeys:read"])["secret"]
        result = grpcurl(
            e2e_server,
            CREATE,
            key=reader,
            data={"tenant_id": tenant, "name": "svc", "scopes": ["passes:read"]},
        )
        assert result.returncode != 0
        assert "PermissionDenied" in result.stdout + result.stderr
