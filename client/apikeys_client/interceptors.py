"""gRPC server interceptors: check each call's ``x-api-key`` metadata with apikeys.

``ApiKeyInterceptor`` for ``grpc.server(..., interceptors=[...])``, ``AsyncApiKeyInterceptor``
for ``grpc.aio.server(interceptors=[...])``::

    interceptor = ApiKeyInterceptor(verifier, tenant_id="acme", scopes={
        "/passes.v1.Passes/GetPass": ["passes:read"],
        "/grpc.health.v1.Health/Check": None,      # public
    })

``scopes`` maps the full method name to the scopes it needs (``None``: public; ``()``: any
valid key), or is a callable ``method -> scopes | None``. A method not in the mapping is refused
(``PERMISSION_DENIED``) unless ``unmapped="authenticate"`` or ``"public"``.

Exactly one ``x-api-key`` metadata entry is accepted. Refused calls end with
``UNAUTHENTICATED`` (no key, malformed, unknown, revoked, expired), ``PERMISSION_DENIED``
(the message names the missing scopes) or ``UNAVAILABLE`` (apikeys could not answer within
``timeout``: fail closed, unless ``fail_open=True``); the message is the HTTP adapters' JSON
``message``, never the key. The handler reads the caller with ``current_identity()``.

The check runs in the handler's own thread (sync server) or task (aio), not in the server's
polling thread, so a slow check never holds up other calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

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

__all__ = ["ApiKeyInterceptor", "AsyncApiKeyInterceptor", "Identity", "current_identity"]

if TYPE_CHECKING:  # generic in grpc-stubs only
    _SyncInterceptor = grpc.ServerInterceptor[Any, Any]
    _AsyncInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _SyncInterceptor = grpc.ServerInterceptor
    _AsyncInterceptor = grpc.aio.ServerInterceptor

_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "apikeys_identity", default=None
)


def current_identity() -> Identity | None:
    """The verified caller of the call being handled; None outside a checked call."""
    return _IDENTITY.get()


class _Base:
    _adapter: str  # names the adapter in its log lines

    def __init__(
        self,
        verifier: Verifier | AsyncVerifier,
        *,
        tenant_id: str | Callable[[str], str] = "",
        scopes: Mapping[str, ScopeValue] | Callable[[str], ScopeValue],
        header: str = DEFAULT_HEADER,
        unmapped: Unmapped = "deny",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        fail_open: bool = False,
    ) -> None:
        self.policy = Policy.for_methods(tenant_id, scopes, unmapped)
        self.gate = Gate(
            verifier, header=header, timeout=timeout, fail_open=fail_open, adapter=self._adapter
        )

    def _values(
        self, context: grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any]
    ) -> list[str | bytes]:
        header = self.gate.header
        return [value for key, value in context.invocation_metadata() or () if key == header]


class ApiKeyInterceptor(_Base, _SyncInterceptor):
    """For the synchronous ``grpc.server``."""

    _adapter = "apikeys gRPC interceptor"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        required = self.policy.required(method)
        if required is None:
            return handler

        def check(context: grpc.ServicerContext) -> Identity:
            if required is False:
                decision: Identity | Denial = self.gate.unmapped()
            else:
                decision = self.gate.decide(
                    self._values(context), self.policy.tenant(method), required
                )
            if isinstance(decision, Denial):
                context.abort(decision.grpc_code, decision.message)
                raise AssertionError("abort returned")  # pragma: no cover
            return decision

        return _wrap_sync(handler, check)


def _set(identity: Identity) -> contextvars.Token[Identity | None]:
    return _IDENTITY.set(identity)


def _reset(token: contextvars.Token[Identity | None]) -> None:
    with contextlib.suppress(ValueError):  # a generator closed in another thread's context
        _IDENTITY.reset(token)


def _stream_with(identity: Identity, responses: Iterable[Any]) -> Iterator[Any]:
    token = _set(identity)
    try:
        yield from responses
    finally:
        _reset(token)


def _wrap_sync(
    handler: grpc.RpcMethodHandler[Any, Any], check: Callable[[grpc.ServicerContext], Identity]
) -> grpc.RpcMethodHandler[Any, Any]:
    h: Any = handler
    options = {
        "request_deserializer": h.request_deserializer,
        "response_serializer": h.response_serializer,
    }

    def unary(inner: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            token = _set(check(context))
            try:
                return inner(request, context)
            finally:
                _reset(token)

        return behavior

    def streaming(inner: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            identity = check(context)
            token = _set(identity)
            try:
                responses = inner(request, context)
            finally:
                _reset(token)
            return _stream_with(identity, responses)

        return behavior

    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(h.unary_unary), **options)
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(h.unary_stream), **options)
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(h.stream_unary), **options)
    return grpc.stream_stream_rpc_method_handler(streaming(h.stream_stream), **options)


class AsyncApiKeyInterceptor(_Base, _AsyncInterceptor):
    """For ``grpc.aio.server``; an async verifier is awaited, a sync one runs in a thread."""

    _adapter = "apikeys gRPC aio interceptor"

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        required = self.policy.required(method)
        if required is None:
            return handler

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
            if required is False:
                decision: Identity | Denial = self.gate.unmapped()
            else:
                decision = await self.gate.decide_async(
                    self._values(context), self.policy.tenant(method), required
                )
            if isinstance(decision, Denial):
                await context.abort(decision.grpc_code, decision.message)
                raise AssertionError("abort returned")  # pragma: no cover
            return decision

        return _wrap_async(handler, check)


def _wrap_async(
    handler: grpc.RpcMethodHandler[Any, Any],
    check: Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[Identity]],
) -> grpc.RpcMethodHandler[Any, Any]:
    h: Any = handler
    options = {
        "request_deserializer": h.request_deserializer,
        "response_serializer": h.response_serializer,
    }

    # Each aio call runs in its own task (its own context copy): no reset needed.
    def unary(inner: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            _IDENTITY.set(await check(context))
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result

        return behavior

    def streaming(inner: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(inner):

            async def generator(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                _IDENTITY.set(await check(context))
                async for response in inner(request, context):
                    yield response

            return generator
        return unary(inner)  # a coroutine that writes with context.write

    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(h.unary_unary), **options)
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(h.unary_stream), **options)
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(h.stream_unary), **options)
    return grpc.stream_stream_rpc_method_handler(streaming(h.stream_stream), **options)
