"""The floor of a cache hit: ``python -m bench.server_main verify-floor``.

A diagnostic, not the product: the real server whose Verify handler does, written inline in
one function, everything a cache hit must do and nothing else — the caller's key and the
presented one hashed and read from the cache (its lock, trust deadline, TTL, LRU order and
hit count), the caller's and the key's state, tenant and scopes checked, one clock read,
both last-used times recorded, the shared answer returned. Anything else (a miss, a refusal,
a caller of another tenant) goes to the real handler. What it costs beyond the authenticated
echo is what the problem requires of a hit in this language and stack; what the real handler
costs beyond it is what layering costs.
"""

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc

from apikeys.v1 import key_verifier_pb2
from apikeys_server.app import App
from apikeys_server.domain import scopes as reserved
from apikeys_server.rpc import convert
from apikeys_server.rpc.key_verifier import KeyVerifierServicer

Handler = Callable[[Any, Any, grpc.ServicerContext], key_verifier_pb2.VerifyResponse]


def floor_handler(app: App, real: Handler) -> Handler:
    """The inline hit path over ``app``'s own cache and last-used recorder (their private
    members: a measurement, not a design)."""
    services = app.services
    cache = services.cache
    positive: Any = cache._positive
    read, touch = positive.read, positive.touch
    acquire, release, timer = cache._lock.acquire, cache._lock.release, cache._timer
    usage = services.last_used
    usage_lock = usage._lock
    names = services.verifier._names
    feed = services.changes
    answers = convert._VALID_ANSWERS
    sha256, now_utc, verify_scope = hashlib.sha256, datetime.now, reserved.VERIFY

    def verify(
        servicer: Any, request: Any, context: grpc.ServicerContext
    ) -> key_verifier_pb2.VerifyResponse:
        caller_key = None
        for name, value in context.invocation_metadata():
            if name == "x-api-key":
                caller_key = value
        if not isinstance(caller_key, str):
            return real(servicer, request, context)
        caller_digest = sha256(caller_key.encode()).digest()
        key_digest = sha256(request.key.encode()).digest()
        moment = timer()
        acquire()
        try:
            caller = read(caller_digest) if moment <= cache._trusted_until else None
            found = read(key_digest)
            hit = (
                caller is not None
                and found is not None
                and moment < caller.cached_until
                and moment < found.cached_until
            )
            if hit:
                touch(caller_digest)
                touch(key_digest)
                cache.hits += 2
        finally:
            release()
        if not hit or caller is None:
            return real(servicer, request, context)
        tenant = request.tenant_id
        required = frozenset(request.required_scopes[:])
        if (
            caller.revoked
            or caller.expire_time is not None
            or verify_scope not in caller.scopes
            or tenant != caller.tenant_id
            or found.tenant_id != tenant
            or found.revoked
            or found.expire_time is not None
            or not required <= found.scopes
            or not required <= names
        ):
            return real(servicer, request, context)
        now = now_utc(UTC)
        with usage_lock:
            pending = usage._pending
            for key_id in (caller.id, found.id):
                before = pending.get(key_id)
                if before is None or before < now:
                    pending[key_id] = now
        known = answers.get(key_digest)
        if known is not None and known[0] is found and known[1] == feed.position:
            answer: key_verifier_pb2.VerifyResponse = known[2]
            return answer
        return real(servicer, request, context)

    return verify


def install() -> Callable[[App], None]:
    """Replaces KeyVerifierServicer.Verify (before the App registers its handlers) by the floor
    handler; returns the function that hands it the App once built."""
    real = KeyVerifierServicer.Verify
    bound: list[Handler] = []

    def verify(
        self: KeyVerifierServicer, request: Any, context: grpc.ServicerContext
    ) -> key_verifier_pb2.VerifyResponse:
        return bound[0](self, request, context)

    KeyVerifierServicer.Verify = verify  # type: ignore[method-assign]
    return lambda app: bound.append(floor_handler(app, real))
