"""WSGI middleware: checks the ``x-api-key`` header with apikeys before the app sees a request.

For Flask (``app.wsgi_app = ApiKeyMiddleware(app.wsgi_app, ...)``), Django
(``application = ApiKeyMiddleware(get_wsgi_application(), ...)``) or any WSGI app. The
arguments and the route mapping are the ASGI middleware's (see ``apikeys_client.asgi``); a
callable ``scopes`` gets the WSGI ``environ``.

Allowed: the app gets the ``Identity`` as ``environ["apikeys.identity"]``. Refused: 401/403 with
``WWW-Authenticate: ApiKey`` and the Envoy adapter's JSON body; 503 when the service cannot
answer within ``timeout`` (fail closed unless ``fail_open=True``). The check blocks the
request's thread for at most ``timeout``.

WSGI servers merge repeated headers into one value joined by commas; such a value is refused
as malformed like several headers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["IDENTITY_KEY", "ApiKeyMiddleware", "Denial", "Identity"]

IDENTITY_KEY = "apikeys.identity"


class ApiKeyMiddleware:
    def __init__(
        self,
        app: WSGIApplication,
        verifier: Verifier | AsyncVerifier,
        *,
        tenant_id: str | Callable[[WSGIEnvironment], str] = "",
        scopes: Mapping[tuple[str, str], ScopeValue] | Callable[[WSGIEnvironment], ScopeValue],
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
            adapter="apikeys WSGI middleware",
        )
        self._environ_key = "HTTP_" + self.gate.header.upper().replace("-", "_")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        required = self.policy.required(environ)
        if required is None:
            return self.app(environ, start_response)
        if required is False:
            decision: Identity | Denial = self.gate.unmapped()
        else:
            value: Any = environ.get(self._environ_key)
            # PEP 3333: header values are latin-1 decoded str; back to the bytes sent.
            values = [] if value is None else [value.encode("latin-1", "replace")]
            decision = self.gate.decide(values, self.policy.tenant(environ), required)
        if isinstance(decision, Denial):
            body = decision.body()
            headers = [*decision.headers(), ("content-length", str(len(body)))]
            start_response(f"{decision.status} {decision.reason}", headers)
            return [body]
        environ[IDENTITY_KEY] = decision
        return self.app(environ, start_response)


def _method_and_path(environ: WSGIEnvironment) -> tuple[str, str]:
    method = str(environ.get("REQUEST_METHOD", "GET")).upper()
    path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", "")) or "/"
    return method, path
