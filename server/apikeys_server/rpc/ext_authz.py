"""``envoy.service.auth.v3.Authorization/Check``: Envoy's ext_authz filter asks Verify's question.

A thin adapter. The decision is ``Verifier.verify`` — the same caller check, tenant rule, scope
catalog, cache and codes as ``KeyVerifier/Verify`` — and this module only translates:

- in: the presented key from one HTTP header of the checked request (raw bytes when Envoy sends
  ``encode_raw_headers``), tenant and required scopes from the route's ``context_extensions``;
  Envoy's own key from the gRPC metadata, like any caller;
- out: an OK with identity headers for the upstream (overwriting whatever the client sent) and
  the key header removed, or a 401/403 with ``WWW-Authenticate: ApiKey`` and a small JSON body.

A route the operator misconfigured (no ``tenant_id``, a scope not in the catalog) is not the
client's fault: Check ends with gRPC ``INVALID_ARGUMENT`` (Envoy then fails closed, 403 by
default) and the problem is logged once per distinct message.
"""

import json
import logging
import threading
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from apikeys_server.domain.errors import InvalidArgument
from apikeys_server.domain.verification import VerifyCode, VerifyResult
from apikeys_server.domain.verifier import Verifier
from apikeys_server.rpc.errors import status_errors
from apikeys_server.rpc.metadata import caller_key

log = logging.getLogger(__name__)

SERVICE_NAME = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name

KEY_ID_HEADER = "x-apikeys-key-id"
TENANT_HEADER = "x-apikeys-tenant-id"
SCOPES_HEADER = "x-apikeys-scopes"
TENANT_EXTENSION = "tenant_id"
SCOPES_EXTENSION = "required_scopes"
# Distinct misconfigurations logged; past this, new ones are no longer logged (bounded memory).
MAX_LOGGED = 256

_MESSAGES = {
    VerifyCode.MISSING: "no API key: send one in the {header} header",
    VerifyCode.MALFORMED: "the API key in the {header} header is not a well-formed key",
    VerifyCode.NOT_FOUND: "the API key is not valid here",
    VerifyCode.REVOKED: "the API key has been revoked",
    VerifyCode.EXPIRED: "the API key has expired",
}

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _set_header(name: str, value: str) -> Any:
    # keep_empty_value: an empty value must still overwrite a client-sent copy, not be dropped.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=_OVERWRITE,
        keep_empty_value=True,
    )


def _denied(http_status: int, rpc_code: int, body: dict[str, object]) -> Any:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=rpc_code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status),
            headers=[
                _set_header("www-authenticate", "ApiKey"),
                _set_header("content-type", "application/json"),
            ],
            body=json.dumps(body, separators=(",", ":")),
        ),
    )


class ExtAuthzServicer:
    """Registered with ``external_auth_pb2_grpc.add_AuthorizationServicer_to_server``.

    Not a subclass of the generated base: xds-protos ships no type stubs (see pyproject).
    """

    def __init__(self, verifier: Verifier, key_header: str, keep_key_header: bool) -> None:
        self._verifier = verifier
        self._key_header = key_header.strip().lower()
        self._remove = [] if keep_key_header else [self._key_header]
        # The answers that depend only on the code are built once.
        self._fixed = {
            code: _denied(
                code.http_status,
                code_pb2.UNAUTHENTICATED,
                {
                    "code": code.name.lower(),
                    "message": message.format(header=self._key_header),
                },
            )
            for code, message in _MESSAGES.items()
        }
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    @status_errors
    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        caller = self._verifier.authenticate(caller_key(context))
        extensions = request.attributes.context_extensions
        try:
            result = self._verifier.verify(
                caller,
                self._presented_key(request.attributes.request.http),
                extensions.get(TENANT_EXTENSION, ""),
                extensions.get(SCOPES_EXTENSION, "").split(),
            )
        except InvalidArgument as error:
            message = f"misconfigured ext_authz route (context_extensions): {error}"
            self._log_once(message)
            raise InvalidArgument(message) from None
        return self._answer(result)

    def _presented_key(self, http: Any) -> str:
        """The key header's value. Several copies are joined with ',' as HTTP merges them, so
        they fail the shape check like any other malformed key; bytes that are not ASCII become
        U+FFFD, which fails it too. Nothing here is ever echoed back or logged."""
        values = [
            entry.raw_value.decode("ascii", "replace") if entry.raw_value else entry.value
            for entry in http.header_map.headers
            if entry.key.lower() == self._key_header
        ]
        if values:
            return ",".join(values)
        value: str = http.headers.get(self._key_header, "")
        return value

    def _answer(self, result: VerifyResult) -> Any:
        if result.valid and result.key is not None:
            key = result.key
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[
                        _set_header(KEY_ID_HEADER, key.id),
                        _set_header(TENANT_HEADER, key.tenant_id),
                        _set_header(SCOPES_HEADER, " ".join(sorted(key.scopes))),
                    ],
                    headers_to_remove=self._remove,
                ),
            )
        if result.code is VerifyCode.INSUFFICIENT_SCOPE:
            missing = list(result.missing_scopes)
            return _denied(
                result.code.http_status,
                code_pb2.PERMISSION_DENIED,
                {
                    "code": result.code.name.lower(),
                    "message": "the API key lacks the required scopes: " + " ".join(missing),
                    "missing_scopes": missing,
                },
            )
        return self._fixed[result.code]

    def _log_once(self, message: str) -> None:
        with self._lock:
            if message in self._logged or len(self._logged) >= MAX_LOGGED:
                return
            self._logged.add(message)
        log.error("%s; Envoy fails such requests closed", message)
