"""ASGI middleware: checks the ``x-api-key`` header with apikeys before the app sees a request.

For Starlette, FastAPI or any ASGI app; it imports neither::

    app = ApiKeyMiddleware(app, verifier, tenant_id="acme", scopes={
        ("GET", "/passes"): ["passes:read"],
        ("POST", "/passes"): ["passes:write"],
        ("*", "/health"): None,            # public
    })

``scopes`` maps ``(method, path prefix)`` (method ``*``: any) to the scopes a route needs
(``None``: public; ``()``: any valid key), the longest prefix winning; or it is a callable
``scope -> scopes | None``. A route not in the mapping is refused (403 ``not_mapped``) unless
``unmapped="authenticate"`` (any valid key) or ``"public"``.

Allowed: the app gets the ``Identity`` as ``scope["apikeys"]`` and ``scope["state"]["apikeys"]``
(Starlette: ``request.state.apikeys``). Refused: 401/403 with ``WWW-Authenticate: ApiKey`` and
the JSON body of the Envoy adapter; 503 when the service cannot answer in time (fail closed).

WebSockets are checked like HTTP, on the handshake (method ``GET``): a refused handshake is
closed with code 1008 before it is accepted (the server then answers HTTP 403). Lifespan and
other scopes pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from apikeys_client._decision import (
    DEFAULT_HEADER,
    DEFAULT_TIMEOUT_SECONDS,
    AsyncVerifier,
    Denial,
    Gate,
    Identity,
    Policy,
    ScopeValue,
    Unmapped,
    Verifier,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["ApiKeyMiddleware", "Denial", "Identity"]


class ApiKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        verifier: Verifier | AsyncVerifier,
        *,
        tenant_id: str | Callable[[Scope], str] = "",
        scopes: Mapping[tuple[str, str], ScopeValue] | Callable[[Scope], ScopeValue],
        header: str = DEFAULT_HEADER,
        unmapped: Unmapped = "deny",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        fail_open: bool = False,
    ) -> None:
        self.app = app
        self.policy = Policy.for_routes(tenant_id, scopes, unmapped, _method_and_path)
        self.gate = Gate(
            verifier,
            header=header,
            timeout=timeout,
            fail_open=fail_open,
            adapter="apikeys ASGI middleware",
        )
        self._header = self.gate.header.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        required = self.policy.required(scope)
        if required is None:
            await self.app(scope, receive, send)
            return
        if required is False:
            decision: Identity | Denial = self.gate.unmapped()
        else:
            values = [value for name, value in scope.get("headers", ()) if name == self._header]
            decision = await self.gate.decide_async(values, self.policy.tenant(scope), required)
        if isinstance(decision, Denial):
            await self._deny(scope, receive, send, decision)
            return
        state = dict(scope.get("state") or {})
        state["apikeys"] = decision
        await self.app({**scope, "apikeys": decision, "state": state}, receive, send)

    @staticmethod
    async def _deny(scope: Scope, receive: Receive, send: Send, denial: Denial) -> None:
        if scope["type"] == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008, "reason": denial.code})
            return
        body = denial.body()
        headers = [(name.encode(), value.encode()) for name, value in denial.headers()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": denial.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _method_and_path(scope: Scope) -> tuple[str, str]:
    method = "GET" if scope["type"] == "websocket" else scope.get("method", "GET")
    return method.upper(), scope.get("path", "/")
