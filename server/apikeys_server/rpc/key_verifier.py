import threading
from collections.abc import Callable, Iterator

import grpc

from apikeys.v1 import key_verifier_pb2, key_verifier_pb2_grpc
from apikeys_server.domain.errors import ResourceExhausted
from apikeys_server.domain.ports import ChangeSource
from apikeys_server.domain.verifier import Verifier
from apikeys_server.domain.watch import watch_changes
from apikeys_server.rpc import convert
from apikeys_server.rpc.errors import status_errors, stream_status_errors
from apikeys_server.rpc.metadata import caller_key


class KeyVerifierServicer(key_verifier_pb2_grpc.KeyVerifierServicer):
    def __init__(
        self,
        verifier: Verifier,
        feed: ChangeSource,
        max_watches: int,
        count: Callable[[int], None] | None = None,
    ) -> None:
        self._verifier = verifier
        self._feed = feed
        # Each answer's code, for the metrics (apikeys_verify_total); None: not counted.
        self._count = count
        # Each watch holds an RPC thread for as long as it runs: keep most for Verify.
        self._watch_slots = threading.BoundedSemaphore(max_watches)

    @status_errors
    def Verify(
        self, request: key_verifier_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> key_verifier_pb2.VerifyResponse:
        # Read before the lookup: every change up to it was evicted before it was published.
        position = self._feed.position
        # required_scopes[:] is a list: slicing upb's container costs a third of iterating it.
        result = self._verifier.verify_as(
            caller_key(context), request.key, request.tenant_id, request.required_scopes[:]
        )
        response = convert.verify_response(result, position)
        if self._count is not None:
            self._count(response.code)
        return response

    @stream_status_errors
    def WatchKeyChanges(
        self, request: key_verifier_pb2.WatchKeyChangesRequest, context: grpc.ServicerContext
    ) -> Iterator[key_verifier_pb2.WatchKeyChangesResponse]:
        caller = self._verifier.authenticate(caller_key(context))
        if not self._watch_slots.acquire(blocking=False):
            raise ResourceExhausted(
                "this server is serving as many watch streams as it allows; "
                "retry later or on another replica",
                reason="TOO_MANY_WATCHES",
            )
        try:
            updates = watch_changes(
                caller, request.tenant_id, request.after_position, self._feed, context.is_active
            )
            for update in updates:
                yield convert.feed_update(update)
        finally:
            self._watch_slots.release()
