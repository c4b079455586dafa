import grpc

from apikeys.v1 import key_verifier_pb2, key_verifier_pb2_grpc
from apikeys_server.domain.verifier import Verifier
from apikeys_server.rpc import convert
from apikeys_server.rpc.errors import status_errors
from apikeys_server.rpc.metadata import caller_key


class KeyVerifierServicer(key_verifier_pb2_grpc.KeyVerifierServicer):
    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier

    @status_errors
    def Verify(
        self, request: key_verifier_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> key_verifier_pb2.VerifyResponse:
        caller = self._verifier.authenticate(caller_key(context))
        result = self._verifier.verify(
            caller, request.key, request.tenant_id, request.required_scopes
        )
        return convert.verify_response(result)
