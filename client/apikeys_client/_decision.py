"""The decision shared by the ASGI, WSGI and gRPC adapters: presented key → allow or deny.

Given a verifier (anything with ``verify(key, required_scopes, *, tenant_id=...)`` returning a
``VerifyResponse``: ``ApiKeysClient``, a caching verifier, or an async one whose ``verify`` is
awaited), the presented header value(s), the tenant and the required scopes, ``Gate`` answers
an ``Identity`` (allowed) or a ``Denial`` (401/403/503 with a JSON body shaped as the Envoy
adapter's: ``{"code": ..., "message": ...}``, plus ``missing_scopes`` for a 403).

Hostile input is refused here, before any call: several key headers, a value over
``MAX_KEY_LENGTH`` characters, bytes that are not printable ASCII → 401 ``malformed``; none or
empty → 401 ``missing``. A body or a log line never holds the presented key.

The service slow or down: each check has the adapter's own deadline (``timeout``, default 1 s),
whatever the verifier's. By default it fails closed (503 ``unavailable``); ``fail_open=True``
allows the request with an unverified ``Identity`` (``verified`` False) and logs a warning at
construction and, rate-limited, on each use. Errors that mean the adapter is misconfigured (its
own key refused, a scope not in the catalog) always fail closed, whatever ``fail_open`` says.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import grpc

from apikeys.v1 import key_verifier_pb2
from apikeys_client._errors import ApiKeysError

log = logging.getLogger("apikeys_client.middleware")

DEFAULT_HEADER = "x-api-key"
DEFAULT_TIMEOUT_SECONDS = 1.0
# Well above any well-formed key (80 at most); a longer value is refused without a call.
MAX_KEY_LENGTH = 256
# At most one warning per this many seconds for fail-open uses and service failures.
LOG_INTERVAL_SECONDS = 10.0

VerifyResponse = key_verifier_pb2.VerifyResponse
Unmapped = Literal["deny", "authenticate", "public"]

_MESSAGES = {
    "missing": "no API key: send one in the {header} header",
    "malformed": "the API key in the {header} header is not a well-formed key",
    "not_found": "the API key is not valid here",
    "revoked": "the API key has been revoked",
    "expired": "the API key has expired",
}
_UNAVAILABLE_MESSAGE = "the API key could not be checked now; try again later"
_UNMAPPED_MESSAGE = "this route or method is not open to API keys"
# Service failures that fail_open may cover; anything else is the adapter's misconfiguration.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class Verifier(Protocol):
    def verify(
        self, key: str, required_scopes: Iterable[str] = ..., *, tenant_id: str = ...
    ) -> VerifyResponse: ...


class AsyncVerifier(Protocol):
    def verify(
        self, key: str, required_scopes: Iterable[str] = ..., *, tenant_id: str = ...
    ) -> Awaitable[VerifyResponse]: ...


@dataclass(frozen=True)
class Identity:
    """Who called: the verified key. ``verified`` is False only for a fail-open pass (then
    ``key_id`` is empty and ``scopes`` empty: the service could not be asked)."""

    key_id: str
    tenant_id: str
    scopes: tuple[str, ...]
    name: str = ""
    verified: bool = True


@dataclass(frozen=True)
class Denial:
    """A refusal: ``status`` 401, 403 or 503 and the JSON body's ``code`` and ``message``."""

    status: int
    code: str
    message: str
    missing_scopes: tuple[str, ...] = ()
    grpc_code: grpc.StatusCode = field(default=grpc.StatusCode.UNAUTHENTICATED)

    def body(self) -> bytes:
        payload: dict[str, object] = {"code": self.code, "message": self.message}
        if self.code == "insufficient_scope":
            payload["missing_scopes"] = list(self.missing_scopes)
        return json.dumps(payload, separators=(",", ":")).encode()

    def headers(self) -> list[tuple[str, str]]:
        headers = [("content-type", "application/json")]
        if self.status in (401, 403):
            headers.insert(0, ("www-authenticate", "ApiKey"))
        return headers

    @property
    def reason(self) -> str:
        """An HTTP reason phrase, for WSGI's status line."""
        return {401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}[self.status]


Decision = Identity | Denial


class _RateLimitedLog:
    """One warning per interval per kind; counts what it held back in between."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval:
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        suffix = f" ({held} more since the last such warning)" if held else ""
        log.warning(message + suffix, *args)


def presented_key(values: Sequence[str | bytes]) -> str | None:
    """The single presented key, "" when none, or None when it is refused as malformed:
    several values (or one holding a comma: HTTP's merge of several), over-long, or anything
    but printable ASCII. Never logged, never echoed."""
    if not values:
        return ""
    if len(values) > 1:
        return None
    value = values[0]
    if len(value) > MAX_KEY_LENGTH:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip(" \t")
    if not value:
        return ""
    if "," in value or not all("!" <= char <= "~" for char in value):
        return None
    return value


class Gate:
    """The decision, with its deadline, fail-open policy and rate-limited logs."""

    def __init__(
        self,
        verifier: Verifier | AsyncVerifier,
        *,
        header: str = DEFAULT_HEADER,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        fail_open: bool = False,
        max_workers: int = 16,
        adapter: str = "apikeys middleware",
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive (seconds)")
        self.verifier = verifier
        self.header = header.strip().lower()
        self.timeout = timeout
        self.fail_open = fail_open
        self._adapter = adapter
        self._max_workers = max_workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._log = _RateLimitedLog()
        self._fixed = {
            code: Denial(401, code, message.format(header=self.header))
            for code, message in _MESSAGES.items()
        }
        self._unmapped = Denial(
            403, "not_mapped", _UNMAPPED_MESSAGE, grpc_code=grpc.StatusCode.PERMISSION_DENIED
        )
        self._unavailable = Denial(
            503, "unavailable", _UNAVAILABLE_MESSAGE, grpc_code=grpc.StatusCode.UNAVAILABLE
        )
        if fail_open:
            log.warning(
                "%s: fail_open=True: while the apikeys service is slow or down, requests are "
                "let through WITHOUT a verified key",
                adapter,
            )

    # -- the parts shared by both flavours -------------------------------------------------

    def precheck(self, values: Sequence[str | bytes]) -> str | Denial:
        """The key to verify, or the denial decided without a call."""
        key = presented_key(values)
        if key is None:
            return self._fixed["malformed"]
        if not key:
            return self._fixed["missing"]
        return key

    def unmapped(self) -> Denial:
        return self._unmapped

    def answer(self, response: VerifyResponse) -> Decision:
        if response.valid:
            return Identity(
                key_id=response.key_id,
                tenant_id=response.tenant_id,
                scopes=tuple(response.scopes),
                name=response.name,
            )
        code = key_verifier_pb2.VerifyCode.Name(response.code).removeprefix("VERIFY_CODE_").lower()
        if code == "insufficient_scope":
            missing = tuple(response.missing_scopes)
            return Denial(
                403,
                code,
                "the API key lacks the required scopes: " + " ".join(missing),
                missing,
                grpc.StatusCode.PERMISSION_DENIED,
            )
        return self._fixed.get(code, self._fixed["not_found"])

    def failed(self, error: BaseException, tenant_id: str) -> Decision:
        """The service did not answer in time, or failed: fail closed, or open if chosen."""
        transient = isinstance(error, TimeoutError | asyncio.TimeoutError) or (
            isinstance(error, ApiKeysError) and error.code in _TRANSIENT
        )
        what = (
            f"no answer within {self.timeout:g} s"
            if isinstance(error, TimeoutError | asyncio.TimeoutError)
            else f"{type(error).__name__}: {getattr(error, 'details', '') or error}"
        )
        if not transient and isinstance(error, ApiKeysError):
            self._log.warning(
                "misconfigured:" + error.code.name,
                "%s: the apikeys service refused the check (%s); is the adapter's own key "
                "valid with apikeys:verify, the tenant right, every scope in the catalog? "
                "Failing closed (503)",
                self._adapter,
                what,
            )
            return self._unavailable
        if self.fail_open:
            self._log.warning(
                "fail-open",
                "%s: apikeys service check failed (%s); FAIL-OPEN: request let through "
                "without a verified key",
                self._adapter,
                what,
            )
            return Identity(key_id="", tenant_id=tenant_id, scopes=(), verified=False)
        self._log.warning(
            "fail-closed",
            "%s: apikeys service check failed (%s); failing closed (503)",
            self._adapter,
            what,
        )
        return self._unavailable

    # -- synchronous -----------------------------------------------------------------------

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self._max_workers, thread_name_prefix="apikeys-verify"
                )
            return self._executor

    def _call_sync(self, key: str, scopes: Sequence[str], tenant_id: str) -> VerifyResponse:
        result: Any = self.verifier.verify(key, scopes, tenant_id=tenant_id)
        if inspect.isawaitable(result):
            return asyncio.run(_awaited(result))
        response: VerifyResponse = result
        return response

    def decide(
        self, values: Sequence[str | bytes], tenant_id: str, scopes: Iterable[str]
    ) -> Decision:
        """For threads (WSGI, the sync gRPC server): blocks up to ``timeout``."""
        key = self.precheck(values)
        if isinstance(key, Denial):
            return key
        future = self._pool().submit(self._call_sync, key, tuple(scopes), tenant_id)
        try:
            response = future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError as error:
            future.cancel()
            return self.failed(TimeoutError(str(error)), tenant_id)
        except Exception as error:
            return self.failed(error, tenant_id)
        return self.answer(response)

    # -- asynchronous ----------------------------------------------------------------------

    async def decide_async(
        self, values: Sequence[str | bytes], tenant_id: str, scopes: Iterable[str]
    ) -> Decision:
        """For an event loop (ASGI, grpc.aio): an async verifier is awaited, a sync one runs
        in a thread; either way bounded by ``timeout``."""
        key = self.precheck(values)
        if isinstance(key, Denial):
            return key
        required = tuple(scopes)
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._call_async(key, required, tenant_id)
        except TimeoutError as error:
            return self.failed(error, tenant_id)
        except Exception as error:
            return self.failed(error, tenant_id)
        return self.answer(response)

    async def _call_async(self, key: str, scopes: Sequence[str], tenant_id: str) -> VerifyResponse:
        verify = self.verifier.verify
        if inspect.iscoroutinefunction(verify):
            response: VerifyResponse = await verify(key, scopes, tenant_id=tenant_id)
            return response
        loop = asyncio.get_running_loop()
        result: Any = await loop.run_in_executor(
            self._pool(), lambda: verify(key, scopes, tenant_id=tenant_id)
        )
        if inspect.isawaitable(result):
            result = await result
        answered: VerifyResponse = result
        return answered

    def close(self) -> None:
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None


async def _awaited(awaitable: Awaitable[VerifyResponse]) -> VerifyResponse:
    return await awaitable


def longest_prefix(
    routes: Sequence[tuple[str, str, tuple[str, ...] | None]], method: str, path: str
) -> tuple[bool, tuple[str, ...] | None]:
    """(found, scopes) for the longest matching path prefix; a method match beats ``*``.
    Prefixes match whole segments: ``/passes`` covers ``/passes`` and ``/passes/1``, not
    ``/passesx``. ``scopes`` None: a public route."""
    best: tuple[tuple[int, bool], tuple[str, ...] | None] | None = None
    for route_method, prefix, scopes in routes:
        if route_method not in ("*", method):
            continue
        trimmed = prefix.rstrip("/")
        if not (prefix == "/" or path == trimmed or path.startswith(trimmed + "/")):
            continue
        rank = (len(trimmed), route_method != "*")
        if best is None or rank > best[0]:
            best = (rank, scopes)
    if best is None:
        return False, None
    return True, best[1]


ScopeValue = Iterable[str] | None


def normalise_routes(
    mapping: dict[tuple[str, str], ScopeValue] | Any,
) -> list[tuple[str, str, tuple[str, ...] | None]]:
    routes = []
    for (method, prefix), scopes in mapping.items():
        if not prefix.startswith("/"):
            raise ValueError(f"route prefix {prefix!r} must start with '/'")
        routes.append((method.upper(), prefix, None if scopes is None else _scopes_tuple(scopes)))
    return routes


def _scopes_tuple(scopes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):
        return tuple(scopes.split())
    return tuple(scopes)


def resolve_scopes(
    found: bool, scopes: tuple[str, ...] | None, unmapped: Unmapped
) -> tuple[str, ...] | Literal[False] | None:
    """What a route needs: its scopes, None (public), or False (refuse: unmapped, "deny")."""
    if found:
        return scopes
    if unmapped == "public":
        return None
    if unmapped == "authenticate":
        return ()
    return False


def callable_scopes(result: ScopeValue) -> tuple[str, ...] | None:
    return None if result is None else _scopes_tuple(result)


TenantOf = str | Callable[[Any], str]
R = TypeVar("R")
Required = tuple[str, ...] | Literal[False] | None
Match = Callable[[R], tuple[bool, tuple[str, ...] | None]]


class Policy(Generic[R]):
    """What an adapter was told of a request ``R`` (an ASGI scope, a WSGI environ, a gRPC
    method name): the tenant it is for, and the scopes it needs — ``Required``: the scopes,
    None (public) or False (refuse: not mapped). Each is a value or a callable of the request;
    a mapping is looked up by the adapter's ``match``."""

    def __init__(
        self,
        tenant_id: str | Callable[[R], str],
        scopes_of: Callable[[R], ScopeValue] | None,
        match: Match[R],
        unmapped: Unmapped,
    ) -> None:
        self._tenant = tenant_id
        self._scopes_of = scopes_of
        self._match = match
        self._unmapped = unmapped

    @classmethod
    def for_routes(
        cls,
        tenant_id: str | Callable[[R], str],
        scopes: Mapping[tuple[str, str], ScopeValue] | Callable[[R], ScopeValue],
        unmapped: Unmapped,
        method_and_path: Callable[[R], tuple[str, str]],
    ) -> Policy[R]:
        """HTTP: ``scopes`` maps (method, path prefix); the longest prefix wins."""
        if callable(scopes):
            return cls(tenant_id, scopes, _unmatched, unmapped)
        routes = normalise_routes(scopes)
        return cls(
            tenant_id, None, lambda request: longest_prefix(routes, *method_and_path(request)),
            unmapped,
        )  # fmt: skip

    @classmethod
    def for_methods(
        cls,
        tenant_id: str | Callable[[str], str],
        scopes: Mapping[str, ScopeValue] | Callable[[str], ScopeValue],
        unmapped: Unmapped,
    ) -> Policy[str]:
        """gRPC: ``scopes`` maps full method names."""
        if callable(scopes):
            return Policy(tenant_id, scopes, _unmatched, unmapped)
        methods = {method: callable_scopes(value) for method, value in scopes.items()}
        return Policy(
            tenant_id, None, lambda method: (method in methods, methods.get(method)), unmapped
        )

    def required(self, request: R) -> Required:
        if self._scopes_of is not None:
            return callable_scopes(self._scopes_of(request))
        return resolve_scopes(*self._match(request), self._unmapped)

    def tenant(self, request: R) -> str:
        return self._tenant if isinstance(self._tenant, str) else self._tenant(request)


def _unmatched(_request: object) -> tuple[bool, tuple[str, ...] | None]:
    return False, None
