"""The ceilings: the project's gRPC server, same factory and settings, answering a constant.

``EchoVerifier`` does nothing at all. ``AuthenticatedEchoVerifier`` does the least work any
authenticated Verify must do: read ``x-api-key`` from the call's metadata, SHA-256 both keys
(the caller's and the presented one), one dict lookup each, return a prebuilt answer.
"""

import hashlib
from collections.abc import Iterable, Iterator

import grpc
import sqlalchemy

from apikeys.v1 import key_verifier_pb2, key_verifier_pb2_grpc
from apikeys_server.app import make_grpc_server
from apikeys_server.config import Settings

# The shape of a real VALID answer, so both servers serialise the same amount.
ECHO_RESPONSE = key_verifier_pb2.VerifyResponse(
    valid=True,
    code=key_verifier_pb2.VERIFY_CODE_VALID,
    http_status=200,
    key_id="key_" + "a" * 24,
    tenant_id="bench",
    name="bench-verified",
    scopes=["passes:read", "passes:write"],
    feed_position=1,
)


class EchoVerifier(key_verifier_pb2_grpc.KeyVerifierServicer):
    def Verify(
        self, request: key_verifier_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> key_verifier_pb2.VerifyResponse:
        return ECHO_RESPONSE

    def WatchKeyChanges(
        self, request: key_verifier_pb2.WatchKeyChangesRequest, context: grpc.ServicerContext
    ) -> Iterator[key_verifier_pb2.WatchKeyChangesResponse]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the echo server only answers Verify")


# What the authenticated echo answers when either key is unknown (the load generator then
# counts a wrong answer: the ceiling is only a ceiling if it did the lookups right).
UNKNOWN_RESPONSE = key_verifier_pb2.VerifyResponse(
    valid=False, code=key_verifier_pb2.VERIFY_CODE_NOT_FOUND, http_status=401
)


class AuthenticatedEchoVerifier(EchoVerifier):
    """Echo, after checking that both keys are known: their digests are looked up in a dict."""

    def __init__(self, digests: Iterable[bytes]) -> None:
        self._known = dict.fromkeys(digests, ECHO_RESPONSE)

    def Verify(
        self, request: key_verifier_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> key_verifier_pb2.VerifyResponse:
        caller: str | bytes = b""
        for name, value in context.invocation_metadata():
            if name == "x-api-key":
                caller = value
        known = self._known
        sha256 = hashlib.sha256
        if not isinstance(caller, str) or known.get(sha256(caller.encode()).digest()) is None:
            return UNKNOWN_RESPONSE
        answer = known.get(sha256(request.key.encode()).digest())
        return UNKNOWN_RESPONSE if answer is None else answer


def stored_digests(database_url: str) -> list[bytes]:
    """Every key digest of a benchmark database (read once, before serving)."""
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as connection:
            return [
                row[0] for row in connection.execute(sqlalchemy.text("SELECT digest FROM api_keys"))
            ]
    finally:
        engine.dispose()


def echo_server(
    settings: Settings, servicer: EchoVerifier | None = None
) -> tuple[grpc.Server, int]:
    """A bound, not started, echo server (``servicer``: the plain echo unless given); returns
    it with its port."""
    server = make_grpc_server(settings)
    key_verifier_pb2_grpc.add_KeyVerifierServicer_to_server(servicer or EchoVerifier(), server)
    return server, server.add_insecure_port(settings.listen)
