"""A thin client over the generated stubs: owns its channel, sends the caller key, deadlines."""

import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from apikeys.v1 import (
    api_key_pb2,
    key_manager_pb2,
    key_manager_pb2_grpc,
    key_verifier_pb2,
    key_verifier_pb2_grpc,
)
from apikeys_client._errors import from_rpc_error

Response = TypeVar("Response")
DEFAULT_TIMEOUT_SECONDS = 5.0


class ApiKeysClient:
    """Calls the apikeys service as the holder of ``api_key`` (sent as ``x-api-key``).

    Use it as a context manager, or call ``close()``. ``target`` is ``host:port``; pass
    ``credentials`` for TLS, or ``channel`` to bring your own (then it is not closed here).
    """

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.secure_channel(target, credentials)
                if credentials is not None
                else grpc.insecure_channel(target)
            )
        self._channel = channel
        self._metadata = (("x-api-key", api_key),)
        self._timeout = timeout
        self._manager = key_manager_pb2_grpc.KeyManagerStub(channel)
        self._verifier = key_verifier_pb2_grpc.KeyVerifierStub(channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def _call(self, method: Callable[..., Response], request: Any) -> Response:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # -- Verify ------------------------------------------------------------------------------

    def verify(
        self, key: str, required_scopes: Iterable[str] = (), *, tenant_id: str = ""
    ) -> key_verifier_pb2.VerifyResponse:
        """Whether ``key`` may make a call needing ``required_scopes``; see ``http_status``."""
        request = key_verifier_pb2.VerifyRequest(
            key=key, tenant_id=tenant_id, required_scopes=list(required_scopes)
        )
        return self._call(self._verifier.Verify, request)

    def watch_key_changes(
        self, after_position: int = 0, *, tenant_id: str = "", timeout: float | None = None
    ) -> Iterator[key_verifier_pb2.WatchKeyChangesResponse]:
        """Key changes after ``after_position`` (0: from now), then as they happen, with a
        heartbeat (no changes) at least every second. Runs until ``timeout`` (None: until the
        iterator is closed) or the server ends it."""
        request = key_verifier_pb2.WatchKeyChangesRequest(
            after_position=after_position, tenant_id=tenant_id
        )
        stream = self._verifier.WatchKeyChanges(request, metadata=self._metadata, timeout=timeout)
        try:
            yield from stream
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]

    # -- management --------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        scopes: Iterable[str],
        *,
        tenant_id: str = "",
        expire_time: datetime | None = None,
        request_id: str | None = None,
    ) -> key_manager_pb2.CreateKeyResponse:
        """Creates a key; the response's ``secret`` is shown this once.

        ``request_id`` makes retries safe (AIP-155): None (the default) sends a fresh UUID,
        ``""`` sends none. To retry a call whose answer was lost, call again with the same
        ``request_id``: within 24 hours the service never makes a second key; it raises
        ``AlreadyExists`` naming the key already made (whose secret cannot be shown again).
        """
        request = key_manager_pb2.CreateKeyRequest(
            tenant_id=tenant_id, name=name, scopes=list(scopes), request_id=_request_id(request_id)
        )
        if expire_time is not None:
            request.expire_time.CopyFrom(_timestamp(expire_time))
        return self._call(self._manager.CreateKey, request)

    def get_key(self, key_id: str, *, tenant_id: str = "") -> api_key_pb2.ApiKey:
        request = key_manager_pb2.GetKeyRequest(tenant_id=tenant_id, key_id=key_id)
        return self._call(self._manager.GetKey, request)

    def list_keys(
        self,
        *,
        tenant_id: str = "",
        include_revoked: bool = False,
        name_prefix: str = "",
        page_size: int = 0,
    ) -> Iterator[api_key_pb2.ApiKey]:
        """Every matching key, newest first, fetching pages lazily."""
        token = ""
        while True:
            request = key_manager_pb2.ListKeysRequest(
                tenant_id=tenant_id,
                page_size=page_size,
                page_token=token,
                include_revoked=include_revoked,
                name_prefix=name_prefix,
            )
            page = self._call(self._manager.ListKeys, request)
            yield from page.keys
            token = page.next_page_token
            if not token:
                return

    def update_key(
        self,
        key_id: str,
        *,
        tenant_id: str = "",
        name: str | None = None,
        scopes: Iterable[str] | None = None,
    ) -> api_key_pb2.ApiKey:
        """Renames and/or re-scopes a key; only the arguments given are changed."""
        paths = []
        request = key_manager_pb2.UpdateKeyRequest(tenant_id=tenant_id, key_id=key_id)
        if name is not None:
            request.name = name
            paths.append("name")
        if scopes is not None:
            request.scopes.extend(scopes)
            paths.append("scopes")
        request.update_mask.CopyFrom(FieldMask(paths=paths))
        return self._call(self._manager.UpdateKey, request)

    def rotate_key(
        self,
        key_id: str,
        overlap: timedelta,
        *,
        tenant_id: str = "",
        request_id: str | None = None,
    ) -> key_manager_pb2.RotateKeyResponse:
        """A successor key (secret shown once); the old one works for ``overlap`` more.

        ``request_id``: as for ``create_key`` (None: a fresh UUID; ``""``: none).
        """
        request = key_manager_pb2.RotateKeyRequest(
            tenant_id=tenant_id, key_id=key_id, request_id=_request_id(request_id)
        )
        request.overlap.CopyFrom(_duration(overlap))
        return self._call(self._manager.RotateKey, request)

    def revoke_key(
        self, key_id: str, *, tenant_id: str = "", reason: str = ""
    ) -> api_key_pb2.ApiKey:
        request = key_manager_pb2.RevokeKeyRequest(
            tenant_id=tenant_id, key_id=key_id, reason=reason
        )
        return self._call(self._manager.RevokeKey, request)

    def list_scopes(self) -> list[api_key_pb2.Scope]:
        response = self._call(self._manager.ListScopes, key_manager_pb2.ListScopesRequest())
        return list(response.scopes)

    def list_events(
        self, *, tenant_id: str = "", key_id: str = "", page_size: int = 0
    ) -> Iterator[api_key_pb2.KeyEvent]:
        """The audit trail, newest first, fetching pages lazily."""
        token = ""
        while True:
            request = key_manager_pb2.ListEventsRequest(
                tenant_id=tenant_id, key_id=key_id, page_size=page_size, page_token=token
            )
            page = self._call(self._manager.ListEvents, request)
            yield from page.events
            token = page.next_page_token
            if not token:
                return

    def revoke_leaked_keys(
        self, secrets: Iterable[str], *, source: str = "", url: str = ""
    ) -> list[key_manager_pb2.LeakedKeyResult]:
        """Revokes the keys of leaked ``secrets`` (at most 1000) and records ``source`` and
        ``url``; one result per secret, in order: its hint and REVOKED, ALREADY_REVOKED,
        NOT_FOUND (or another tenant's) or MALFORMED."""
        request = key_manager_pb2.RevokeLeakedKeysRequest(
            secrets=list(secrets), source=source, url=url
        )
        return list(self._call(self._manager.RevokeLeakedKeys, request).results)


def _request_id(given: str | None) -> str:
    """A fresh UUID unless the caller chose an id (or ``""``: none)."""
    return str(uuid.uuid4()) if given is None else given


def _timestamp(value: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(value)
    return message


def _duration(value: timedelta) -> Duration:
    message = Duration()
    message.FromTimedelta(value)
    return message
