"""The Python adapters (apikeys_client.asgi, .wsgi, .interceptors) with real apps and a real
apikeys server over SQLite: a Starlette app through its TestClient (httpx), a Flask app through
its test client, a grpc server and a grpc.aio server through real channels."""

import asyncio
import json
import logging
import re
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from flask import Flask, request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from apikeys_client import ApiKeysClient, asgi, interceptors, wsgi
from apikeys_client.asgi import Identity
from apikeys_client.interceptors import current_identity
from tests.support import RunningServer, running_server, server_settings

README = Path(__file__).resolve().parents[2] / "README.md"
TENANT = "acme"
ROUTES: dict[tuple[str, str], Any] = {
    ("GET", "/passes"): ["passes:read"],
    ("POST", "/passes"): ["passes:write"],
    ("*", "/health"): None,
    ("GET", "/ws"): ["passes:read"],
}


@dataclass
class World:
    server: RunningServer
    verifier: ApiKeysClient
    read_key: str
    read_key_id: str
    revoked_key: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    url = f"sqlite:///{tmp_path_factory.mktemp('mw') / 'apikeys.db'}"
    with running_server(server_settings(url)) as server, server.client() as admin:
        read = admin.create_key("reader", ["passes:read"], tenant_id=TENANT)
        revoked = admin.create_key("gone", ["passes:read"], tenant_id=TENANT)
        admin.revoke_key(revoked.key.id, tenant_id=TENANT)
        verifier = ApiKeysClient(server.target, server.admin_key)
        try:
            yield World(server, verifier, read.secret, read.key.id, revoked.secret)
        finally:
            verifier.close()


def down_verifier() -> ApiKeysClient:
    """A client of an address where nothing listens: every call fails UNAVAILABLE."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ApiKeysClient(f"127.0.0.1:{port}", "ak_whatever")


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An address that accepts TCP and never answers: calls hang until a deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


# -- the apps --------------------------------------------------------------------------------


def starlette_app(verifier: Any, **options: Any) -> Starlette:
    async def passes(request: Request) -> JSONResponse:
        identity: Identity = request.scope["apikeys"]
        assert request.state.apikeys is identity
        return JSONResponse(
            {
                "key_id": identity.key_id,
                "tenant_id": identity.tenant_id,
                "scopes": list(identity.scopes),
                "verified": identity.verified,
            }
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "identity": "apikeys" in request.scope})

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.scope["apikeys"].key_id)
        await websocket.close()

    options.setdefault("tenant_id", TENANT)
    options.setdefault("scopes", ROUTES)
    return Starlette(
        routes=[
            Route("/passes", passes, methods=["GET", "POST"]),
            Route("/health", health),
            Route("/other", health),
            WebSocketRoute("/ws", ws),
        ],
        middleware=[Middleware(asgi.ApiKeyMiddleware, verifier=verifier, **options)],
    )


def flask_app(verifier: Any, **options: Any) -> Flask:
    app = Flask(__name__)

    @app.route("/passes", methods=["GET", "POST"])
    def passes() -> dict[str, Any]:
        identity: Identity = request.environ[wsgi.IDENTITY_KEY]
        return {"key_id": identity.key_id, "scopes": list(identity.scopes)}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    options.setdefault("tenant_id", TENANT)
    options.setdefault("scopes", ROUTES)
    app.wsgi_app = wsgi.ApiKeyMiddleware(app.wsgi_app, verifier, **options)  # type: ignore[method-assign]
    return app


class HttpHarness:
    """One interface over both apps: (status, headers, json body)."""

    def __init__(self, kind: str, verifier: Any, **options: Any) -> None:
        self.kind = kind
        if kind == "asgi":
            self._asgi = TestClient(starlette_app(verifier, **options))
        else:
            self._wsgi = flask_app(verifier, **options).test_client()

    def call(
        self, method: str, path: str, headers: list[tuple[Any, Any]] | None = None
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        if self.kind == "asgi":
            response = self._asgi.request(method, path, headers=headers or [])
            return response.status_code, dict(response.headers), response.json()
        answer = self._wsgi.open(path, method=method, headers=headers or [])
        return answer.status_code, dict(answer.headers), json.loads(answer.data)


@pytest.fixture(params=["asgi", "wsgi"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def assert_refused(
    answer: tuple[int, dict[str, str], dict[str, Any]], status: int, code: str, *secrets: str
) -> dict[str, Any]:
    got_status, headers, body = answer
    assert (got_status, body["code"]) == (status, code), body
    lower = {name.lower(): value for name, value in headers.items()}
    assert lower["content-type"] == "application/json"
    if status in (401, 403):
        assert lower["www-authenticate"] == "ApiKey"
    text = json.dumps(body)
    for secret in secrets:
        assert secret not in text
    return body


# -- HTTP: ASGI and WSGI -----------------------------------------------------------------------


class TestHttp:
    def test_good_key_gets_200_with_identity(self, world: World, kind: str) -> None:
        http = HttpHarness(kind, world.verifier)
        status, _, body = http.call("GET", "/passes", [("x-api-key", world.read_key)])
        assert status == 200
        assert body["key_id"] == world.read_key_id
        assert body["scopes"] == ["passes:read"]

    def test_no_key_bad_key_revoked_are_401(self, world: World, kind: str) -> None:
        http = HttpHarness(kind, world.verifier)
        body = assert_refused(http.call("GET", "/passes"), 401, "missing")
        assert body["message"] == "no API key: send one in the x-api-key header"
        assert_refused(
            http.call("GET", "/passes", [("x-api-key", "ak_not-a-key")]), 401, "malformed"
        )
        fake = "ak_" + "A" * 38
        assert_refused(http.call("GET", "/passes", [("x-api-key", fake)]), 401, "malformed", fake)
        assert_refused(
            http.call("GET", "/passes", [("x-api-key", world.revoked_key)]),
            401,
            "revoked",
            world.revoked_key,
        )

    def test_missing_scope_is_403_naming_it(self, world: World, kind: str) -> None:
        http = HttpHarness(kind, world.verifier)
        answer = http.call("POST", "/passes", [("x-api-key", world.read_key)])
        body = assert_refused(answer, 403, "insufficient_scope", world.read_key)
        assert body == {
            "code": "insufficient_scope",
            "message": "the API key lacks the required scopes: passes:write",
            "missing_scopes": ["passes:write"],
        }

    def test_public_route_needs_no_key_and_unmapped_is_refused(
        self, world: World, kind: str
    ) -> None:
        http = HttpHarness(kind, world.verifier)
        status, _, body = http.call("GET", "/health", [("x-api-key", "garbage\x01")])
        assert (status, body["ok"]) == (200, True)
        if kind == "asgi":
            assert_refused(
                http.call("GET", "/other", [("x-api-key", world.read_key)]), 403, "not_mapped"
            )

    def test_other_tenant_key_is_401(self, world: World, kind: str) -> None:
        http = HttpHarness(kind, world.verifier, tenant_id="globex")
        answer = http.call("GET", "/passes", [("x-api-key", world.read_key)])
        assert_refused(answer, 401, "not_found", world.read_key)

    @pytest.mark.parametrize(
        ("name", "code"),
        [
            ("empty", "missing"),
            ("blank", "missing"),
            ("too_long", "malformed"),
            ("two_headers", "malformed"),
            ("comma", "malformed"),
            ("non_ascii", "malformed"),
            ("control", "malformed"),
            ("nul", "malformed"),
        ],
    )
    def test_hostile_headers_are_401_never_500_never_echoed(
        self, world: World, kind: str, name: str, code: str
    ) -> None:
        good = world.read_key
        values: dict[str, list[Any]] = {
            "empty": [""],
            "blank": ["   "],
            "too_long": [good + "x" * 300],
            "two_headers": [good, good],
            "comma": [f"{good},{good}"],
            "non_ascii": [(good[:-1] + "é").encode("utf-8")],
            "control": [(good[:10] + "\x01" + good[10:]).encode("latin-1")],
            "nul": [(good[:10] + "\x00" + good[10:]).encode("latin-1")],
        }
        headers = [("x-api-key", value) for value in values[name]]
        if kind == "wsgi":  # the test client takes str (latin-1), as a WSGI server decodes
            headers = [
                (key, value.decode("latin-1") if isinstance(value, bytes) else value)
                for key, value in headers
            ]
        answer = http_call(HttpHarness(kind, world.verifier), headers)
        assert_refused(answer, 401, code, good, good[:20])

    def test_service_down_fails_closed_503(self, world: World, kind: str) -> None:
        with down_verifier() as verifier:
            http = HttpHarness(kind, verifier)
            answer = http.call("GET", "/passes", [("x-api-key", world.read_key)])
        body = assert_refused(answer, 503, "unavailable", world.read_key)
        assert body["message"] == "the API key could not be checked now; try again later"

    def test_service_silent_fails_closed_within_the_deadline(
        self, world: World, kind: str, blackhole: str
    ) -> None:
        with ApiKeysClient(blackhole, "ak_whatever", timeout=10) as verifier:
            http = HttpHarness(kind, verifier, timeout=0.3)
            started = time.monotonic()
            answer = http.call("GET", "/passes", [("x-api-key", world.read_key)])
            elapsed = time.monotonic() - started
        assert_refused(answer, 503, "unavailable")
        assert elapsed < 2.0

    def test_fail_open_lets_through_unverified_and_says_so(
        self, world: World, kind: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, "apikeys_client.middleware")
        with down_verifier() as verifier:
            http = HttpHarness(kind, verifier, fail_open=True)
            first = http.call("GET", "/passes", [("x-api-key", world.read_key)])
            # Starlette builds its middleware on the first request: the construction warning.
            assert any("fail_open=True" in r.getMessage() for r in caplog.records)
            second = http.call("GET", "/passes", [("x-api-key", world.read_key)])
            # A malformed key is still refused: fail-open only covers the service's silence.
            refused = http.call("GET", "/passes", [("x-api-key", "x" * 300)])
        assert first[0] == second[0] == 200
        assert first[2]["key_id"] == ""
        if kind == "asgi":
            assert first[2]["verified"] is False
        assert_refused(refused, 401, "malformed")
        uses = [r for r in caplog.records if "FAIL-OPEN" in r.getMessage()]
        assert len(uses) == 1  # rate-limited: one warning for both requests
        assert all(world.read_key not in r.getMessage() for r in caplog.records)


def http_call(
    http: HttpHarness, headers: list[tuple[str, Any]]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    return http.call("GET", "/passes", headers)


class TestAsgiOnly:
    def test_prefixes_match_whole_segments_longest_first(self, world: World) -> None:
        routes = {
            **ROUTES,
            ("*", "/passes/public"): None,
            ("GET", "/passes/admin"): ["customers:read"],
        }
        client = TestClient(starlette_app(world.verifier, scopes=routes))
        key = {"x-api-key": world.read_key}
        assert client.get("/passesx", headers=key).json()["code"] == "not_mapped"
        assert client.get("/passes/public/1").status_code == 404  # public: reached the app
        answer = client.get("/passes/admin/1", headers=key)
        assert (answer.status_code, answer.json()["missing_scopes"]) == (403, ["customers:read"])
        assert client.get("/passes/1", headers=key).status_code == 404  # allowed: the app's 404

    def test_async_verifier_is_awaited(self, world: World) -> None:
        class AsyncVerifier:
            calls = 0

            async def verify(
                self, key: str, required_scopes: Iterable[str] = (), *, tenant_id: str = ""
            ) -> Any:
                AsyncVerifier.calls += 1
                return await asyncio.to_thread(
                    world.verifier.verify, key, required_scopes, tenant_id=tenant_id
                )

        client = TestClient(starlette_app(AsyncVerifier()))
        assert client.get("/passes", headers={"x-api-key": world.read_key}).status_code == 200
        assert client.post("/passes", headers={"x-api-key": world.read_key}).status_code == 403
        assert AsyncVerifier.calls == 2

    def test_websocket_checked_on_handshake(self, world: World) -> None:
        client = TestClient(starlette_app(world.verifier))
        with client.websocket_connect("/ws", headers={"x-api-key": world.read_key}) as ws:
            assert ws.receive_text() == world.read_key_id
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/ws"):
            pass
        assert refused.value.code == 1008

    def test_callable_scopes_and_lifespan_pass_through(self, world: World) -> None:
        def scopes(scope: Any) -> list[str] | None:
            return None if scope["path"] == "/health" else ["passes:read"]

        with TestClient(starlette_app(world.verifier, scopes=scopes)) as client:  # lifespan
            assert client.get("/health").status_code == 200
            assert client.get("/other").status_code == 401
            ok = client.get("/other", headers={"x-api-key": world.read_key})
            assert ok.status_code == 200


# -- gRPC servers ------------------------------------------------------------------------------

METHODS: dict[str, Any] = {
    "/demo.Demo/Who": ["passes:read"],
    "/demo.Demo/WhoStream": ["passes:read"],
    "/demo.Demo/Write": ["passes:write"],
    "/demo.Demo/Public": None,
}


def _who(request: bytes, context: Any) -> bytes:
    identity = current_identity()
    return b"" if identity is None else identity.key_id.encode()


def sync_handlers() -> grpc.GenericRpcHandler:
    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(2):
            yield _who(request, context)

    return grpc.method_handlers_generic_handler(
        "demo.Demo",
        {
            "Who": grpc.unary_unary_rpc_method_handler(_who),
            "WhoStream": grpc.unary_stream_rpc_method_handler(stream),
            "Write": grpc.unary_unary_rpc_method_handler(_who),
            "Public": grpc.unary_unary_rpc_method_handler(_who),
            "Unmapped": grpc.unary_unary_rpc_method_handler(_who),
        },
    )


def async_handlers() -> grpc.GenericRpcHandler:
    async def who(request: bytes, context: Any) -> bytes:
        return _who(request, context)

    async def stream(request: bytes, context: Any) -> Any:
        for _ in range(2):
            yield _who(request, context)

    return grpc.method_handlers_generic_handler(
        "demo.Demo",
        {
            name: grpc.unary_unary_rpc_method_handler(who)
            for name in ("Who", "Write", "Public", "Unmapped")
        }
        | {"WhoStream": grpc.unary_stream_rpc_method_handler(stream)},
    )


def call(
    channel: grpc.Channel, method: str, metadata: list[tuple[str, str]] | None = None
) -> tuple[grpc.StatusCode, str, bytes]:
    try:
        if method.endswith("Stream"):
            answers = list(channel.unary_stream(method)(b"", metadata=metadata, timeout=10))
            assert answers[0] == answers[1]
            return grpc.StatusCode.OK, "", answers[0]
        return (
            grpc.StatusCode.OK,
            "",
            channel.unary_unary(method)(b"", metadata=metadata, timeout=10),
        )
    except grpc.RpcError as error:
        return error.code(), error.details() or "", b""  # type: ignore[attr-defined]


def check_grpc_decisions(channel: grpc.Channel, world: World) -> None:
    key = [("x-api-key", world.read_key)]
    assert call(channel, "/demo.Demo/Who", key) == (
        grpc.StatusCode.OK,
        "",
        world.read_key_id.encode(),
    )
    assert call(channel, "/demo.Demo/WhoStream", key)[2] == world.read_key_id.encode()
    assert call(channel, "/demo.Demo/Public") == (grpc.StatusCode.OK, "", b"")
    code, message, _ = call(channel, "/demo.Demo/Write", key)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert message == "the API key lacks the required scopes: passes:write"
    assert call(channel, "/demo.Demo/Unmapped", key)[0] == grpc.StatusCode.PERMISSION_DENIED
    for metadata in (
        [],
        [("x-api-key", "")],
        [("x-api-key", "ak_not-a-key")],
        [("x-api-key", world.revoked_key)],
        [("x-api-key", world.read_key), ("x-api-key", world.read_key)],
        [("x-api-key", world.read_key + "x" * 300)],
    ):
        code, message, _ = call(channel, "/demo.Demo/Who", metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (metadata, message)
        assert world.read_key not in message
        assert world.read_key[:20] not in message


class TestGrpc:
    def test_sync_interceptor(self, world: World) -> None:
        server = grpc.server(
            futures.ThreadPoolExecutor(4),
            interceptors=[
                interceptors.ApiKeyInterceptor(world.verifier, tenant_id=TENANT, scopes=METHODS)
            ],
        )
        server.add_generic_rpc_handlers([sync_handlers()])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                check_grpc_decisions(channel, world)
        finally:
            server.stop(None)
        assert current_identity() is None

    def test_sync_interceptor_fails_closed_and_open(self, world: World) -> None:
        for fail_open, expected in ((False, grpc.StatusCode.UNAVAILABLE), (True, None)):
            with down_verifier() as verifier:
                server = grpc.server(
                    futures.ThreadPoolExecutor(2),
                    interceptors=[
                        interceptors.ApiKeyInterceptor(
                            verifier, tenant_id=TENANT, scopes=METHODS, fail_open=fail_open
                        )
                    ],
                )
                server.add_generic_rpc_handlers([sync_handlers()])
                port = server.add_insecure_port("127.0.0.1:0")
                server.start()
                try:
                    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                        code, _, body = call(
                            channel, "/demo.Demo/Who", [("x-api-key", world.read_key)]
                        )
                finally:
                    server.stop(None)
            if expected is None:
                assert (code, body) == (grpc.StatusCode.OK, b"")  # unverified: no key id
            else:
                assert code == expected

    def test_async_interceptor(self, world: World) -> None:
        async def main() -> None:
            server = grpc.aio.server(
                interceptors=[
                    interceptors.AsyncApiKeyInterceptor(
                        world.verifier, tenant_id=TENANT, scopes=METHODS
                    )
                ]
            )
            server.add_generic_rpc_handlers([async_handlers()])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    await asyncio.to_thread(check_grpc_decisions, channel, world)
                with down_verifier() as verifier:
                    server2 = grpc.aio.server(
                        interceptors=[
                            interceptors.AsyncApiKeyInterceptor(
                                verifier, tenant_id=TENANT, scopes=METHODS
                            )
                        ]
                    )
                    server2.add_generic_rpc_handlers([async_handlers()])
                    port2 = server2.add_insecure_port("127.0.0.1:0")
                    await server2.start()
                    try:
                        with grpc.insecure_channel(f"127.0.0.1:{port2}") as channel:
                            code, _, _ = await asyncio.to_thread(
                                call, channel, "/demo.Demo/Who", [("x-api-key", world.read_key)]
                            )
                        assert code == grpc.StatusCode.UNAVAILABLE
                    finally:
                        await server2.stop(None)
            finally:
                await server.stop(None)

        asyncio.run(main())


# -- the README's examples ---------------------------------------------------------------------


def readme_examples() -> list[str]:
    section = README.read_text().split("## Python adapters", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```py\n(.*?)```", section, re.DOTALL)


class TestReadme:
    def test_examples_run_and_decide(self, world: World) -> None:
        asgi_example, wsgi_example, grpc_example = readme_examples()
        good = {"x-api-key": world.read_key}

        def run(example: str) -> dict[str, Any]:
            code = example.replace("localhost:50051", world.server.target)
            namespace: dict[str, Any] = {"ADMIN": world.server.admin_key, "__name__": "readme"}
            exec(compile(code, "README.md", "exec"), namespace)
            return namespace

        namespace = run(asgi_example)
        with TestClient(namespace["app"]) as client:
            assert client.get("/passes", headers=good).json() == {"caller": world.read_key_id}
            assert client.get("/passes").status_code == 401
            assert client.get("/health").status_code == 200
        namespace["verifier"].close()

        namespace = run(wsgi_example)
        flask_client = namespace["flask_app"].test_client()
        assert flask_client.get("/passes", headers=good).json == {"caller": world.read_key_id}
        assert flask_client.get("/passes").status_code == 401
        namespace["verifier"].close()

        namespace = run(grpc_example)
        server = namespace["server"]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert call(channel, "/demo.Demo/Who", list(good.items()))[2] == (
                    world.read_key_id.encode()
                )
                assert call(channel, "/demo.Demo/Who")[0] == grpc.StatusCode.UNAUTHENTICATED
        finally:
            server.stop(None)
            namespace["verifier"].close()
