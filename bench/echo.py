"""The ceiling: the project's gRPC server, same factory and settings, answering a constant."""

from collections.abc import Iterator

import grpc

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


def echo_server(settings: Settings) -> tuple[grpc.Server, int]:
    """A bound, not started, echo server; returns it with its port."""
    server = make_grpc_server(settings)
    key_verifier_pb2_grpc.add_KeyVerifierServicer_to_server(EchoVerifier(), server)
    return server, server.add_insecure_port(settings.listen)
