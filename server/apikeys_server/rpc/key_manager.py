import grpc

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_manager_pb2_grpc
from apikeys_server.domain.clock import Clock
from apikeys_server.domain.manager import KeyManager
from apikeys_server.domain.verifier import Verifier
from apikeys_server.logs import audit
from apikeys_server.rpc import convert
from apikeys_server.rpc.errors import status_errors
from apikeys_server.rpc.metadata import caller_key


class KeyManagerServicer(key_manager_pb2_grpc.KeyManagerServicer):
    def __init__(self, manager: KeyManager, verifier: Verifier, clock: Clock) -> None:
        self._manager = manager
        self._verifier = verifier
        self._clock = clock

    @status_errors
    def CreateKey(
        self, request: key_manager_pb2.CreateKeyRequest, context: grpc.ServicerContext
    ) -> key_manager_pb2.CreateKeyResponse:
        caller = self._verifier.authenticate(caller_key(context))
        expire_time = convert.optional_datetime(
            request.expire_time, "expire_time", request.HasField("expire_time")
        )
        issued = self._manager.create(
            caller,
            request.tenant_id,
            request.name,
            request.scopes,
            expire_time,
            request_id=request.request_id,
        )
        audit("created", caller.key_id, issued.key.tenant_id, issued.key.id)
        return key_manager_pb2.CreateKeyResponse(
            key=convert.api_key(issued.key, self._clock.now()), secret=issued.secret
        )

    @status_errors
    def GetKey(
        self, request: key_manager_pb2.GetKeyRequest, context: grpc.ServicerContext
    ) -> api_key_pb2.ApiKey:
        caller = self._verifier.authenticate(caller_key(context))
        key = self._manager.get(caller, request.tenant_id, request.key_id)
        return convert.api_key(key, self._clock.now())

    @status_errors
    def ListKeys(
        self, request: key_manager_pb2.ListKeysRequest, context: grpc.ServicerContext
    ) -> key_manager_pb2.ListKeysResponse:
        caller = self._verifier.authenticate(caller_key(context))
        page = self._manager.list_keys(
            caller,
            request.tenant_id,
            request.page_size,
            request.page_token,
            request.include_revoked,
            request.name_prefix,
        )
        now = self._clock.now()
        return key_manager_pb2.ListKeysResponse(
            keys=[convert.api_key(key, now) for key in page.items],
            next_page_token=page.next_page_token,
        )

    @status_errors
    def UpdateKey(
        self, request: key_manager_pb2.UpdateKeyRequest, context: grpc.ServicerContext
    ) -> api_key_pb2.ApiKey:
        caller = self._verifier.authenticate(caller_key(context))
        key = self._manager.update(
            caller,
            request.tenant_id,
            request.key_id,
            request.name,
            list(request.scopes),
            list(request.update_mask.paths),
        )
        audit(
            "updated",
            caller.key_id,
            key.tenant_id,
            key.id,
            fields=",".join(request.update_mask.paths),
        )
        return convert.api_key(key, self._clock.now())

    @status_errors
    def RotateKey(
        self, request: key_manager_pb2.RotateKeyRequest, context: grpc.ServicerContext
    ) -> key_manager_pb2.RotateKeyResponse:
        caller = self._verifier.authenticate(caller_key(context))
        overlap = convert.duration(request.overlap, "overlap")
        rotation = self._manager.rotate(
            caller, request.tenant_id, request.key_id, overlap, request_id=request.request_id
        )
        issued = rotation.issued.key
        audit("rotated", caller.key_id, issued.tenant_id, issued.id, previous=rotation.previous.id)
        now = self._clock.now()
        return key_manager_pb2.RotateKeyResponse(
            key=convert.api_key(rotation.issued.key, now),
            secret=rotation.issued.secret,
            previous=convert.api_key(rotation.previous, now),
        )

    @status_errors
    def RevokeKey(
        self, request: key_manager_pb2.RevokeKeyRequest, context: grpc.ServicerContext
    ) -> api_key_pb2.ApiKey:
        caller = self._verifier.authenticate(caller_key(context))
        key = self._manager.revoke(caller, request.tenant_id, request.key_id, request.reason)
        audit("revoked", caller.key_id, key.tenant_id, key.id)
        return convert.api_key(key, self._clock.now())

    @status_errors
    def RevokeLeakedKeys(
        self, request: key_manager_pb2.RevokeLeakedKeysRequest, context: grpc.ServicerContext
    ) -> key_manager_pb2.RevokeLeakedKeysResponse:
        caller = self._verifier.authenticate(caller_key(context))
        results = self._manager.revoke_leaked(
            caller, list(request.secrets), request.source, request.url
        )
        return key_manager_pb2.RevokeLeakedKeysResponse(
            results=[convert.leak_result(result) for result in results]
        )

    @status_errors
    def ListScopes(
        self, request: key_manager_pb2.ListScopesRequest, context: grpc.ServicerContext
    ) -> key_manager_pb2.ListScopesResponse:
        caller = self._verifier.authenticate(caller_key(context))
        scopes = self._manager.list_scopes(caller)
        return key_manager_pb2.ListScopesResponse(scopes=[convert.scope(s) for s in scopes])

    @status_errors
    def ListEvents(
        self, request: key_manager_pb2.ListEventsRequest, context: grpc.ServicerContext
    ) -> key_manager_pb2.ListEventsResponse:
        caller = self._verifier.authenticate(caller_key(context))
        page = self._manager.list_events(
            caller, request.tenant_id, request.key_id, request.page_size, request.page_token
        )
        return key_manager_pb2.ListEventsResponse(
            events=[convert.key_event(event) for event in page.items],
            next_page_token=page.next_page_token,
        )
