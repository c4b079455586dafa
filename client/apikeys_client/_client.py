"""The blocking client: owns its channel, sends the caller key, deadlines; requests are built
and errors mapped by the modules both clients share (``_requests``, ``_errors``)."""

from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from apikeys.v1 import (
    api_key_pb2,
    key_manager_pb2,
    key_manager_pb2_grpc,
    key_verifier_pb2,
    key_verifier_pb2_grpc,
)
from apikeys_client import _requests as build
from apikeys_client._errors import from_rpc_error
from apikeys_client._requests import DEFAULT_TIMEOUT_SECONDS

Response = TypeVar("Response")

__all__ = ["DEFAULT_TIMEOUT_SECONDS", "ApiKeysClient", "WatchStream"]


class WatchStream(Iterator[key_verifier_pb2.WatchKeyChangesResponse]):
    """The messages of a WatchKeyChanges call; ``cancel()`` (from any thread) ends it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> key_verifier_pb2.WatchKeyChangesResponse:
        try:
            message: key_verifier_pb2.WatchKeyChangesResponse = next(self._call)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return message

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel


class ApiKeysClient:
    """Calls the apikeys service as the holder of ``api_key`` (sent as ``x-api-key``).

    Use it as a context manager, or call ``close()``. ``target`` is ``host:port``, a list
    ``"host1:50051,host2:50051"`` or a gRPC URI such as ``dns:///apikeys:50051`` (calls are
    spread round robin over every address). Pass ``credentials`` for TLS, or ``channel`` to
    bring your own (then it is not closed here, and its options are yours). Idempotent calls
    (Verify, GetKey, ListKeys, ListScopes, ListEvents) are retried on UNAVAILABLE within
    ``timeout``; ``retries=False`` turns that off.
    """

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        retries: bool = True,
        keepalive_seconds: float = 30.0,
    ) -> None:
        self._owns_channel = channel is None
        if channel is None:
            resolved, authority = build.channel_target(target)
            options = build.channel_options(
                retries=retries, keepalive_seconds=keepalive_seconds, authority=authority
            )
            channel = (
                grpc.secure_channel(resolved, credentials, options)
                if credentials is not None
                else grpc.insecure_channel(resolved, options)
            )
        self._channel = channel
        self._metadata = build.metadata(api_key)
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
        return self._call(self._verifier.Verify, build.verify(key, required_scopes, tenant_id))

    def watch_key_changes(
        self, after_position: int = 0, *, tenant_id: str = "", timeout: float | None = None
    ) -> WatchStream:
        """Key changes after ``after_position`` (0: from now), then as they happen, with a
        heartbeat (no changes) at least every second. Runs until ``timeout`` (None: until
        ``cancel()``) or the server ends it."""
        request = build.watch_key_changes(after_position, tenant_id)
        call = self._verifier.WatchKeyChanges(request, metadata=self._metadata, timeout=timeout)
        return WatchStream(call)

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
        request = build.create_key(name, scopes, tenant_id, expire_time, request_id)
        return self._call(self._manager.CreateKey, request)

    def get_key(self, key_id: str, *, tenant_id: str = "") -> api_key_pb2.ApiKey:
        return self._call(self._manager.GetKey, build.get_key(key_id, tenant_id))

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
            request = build.list_keys(token, tenant_id, include_revoked, name_prefix, page_size)
            page = self._call(self._manager.ListKeys, request)
            yield from page.keys
            if not (token := page.next_page_token):
                return

    def list_keys_page(
        self,
        page_token: str = "",
        *,
        tenant_id: str = "",
        include_revoked: bool = False,
        name_prefix: str = "",
        page_size: int = 0,
    ) -> key_manager_pb2.ListKeysResponse:
        """One page of matching keys, newest first, and the ``next_page_token`` ("" after the
        last page): for callers that page on request, as a web page does."""
        request = build.list_keys(page_token, tenant_id, include_revoked, name_prefix, page_size)
        return self._call(self._manager.ListKeys, request)

    def update_key(
        self,
        key_id: str,
        *,
        tenant_id: str = "",
        name: str | None = None,
        scopes: Iterable[str] | None = None,
    ) -> api_key_pb2.ApiKey:
        """Renames and/or re-scopes a key; only the arguments given are changed."""
        request = build.update_key(key_id, tenant_id, name, scopes)
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
        request = build.rotate_key(key_id, overlap, tenant_id, request_id)
        return self._call(self._manager.RotateKey, request)

    def revoke_key(
        self, key_id: str, *, tenant_id: str = "", reason: str = ""
    ) -> api_key_pb2.ApiKey:
        return self._call(self._manager.RevokeKey, build.revoke_key(key_id, tenant_id, reason))

    def list_scopes(self) -> list[api_key_pb2.Scope]:
        return list(self._call(self._manager.ListScopes, build.list_scopes()).scopes)

    def list_events(
        self, *, tenant_id: str = "", key_id: str = "", page_size: int = 0
    ) -> Iterator[api_key_pb2.KeyEvent]:
        """The audit trail, newest first, fetching pages lazily."""
        token = ""
        while True:
            request = build.list_events(token, tenant_id, key_id, page_size)
            page = self._call(self._manager.ListEvents, request)
            yield from page.events
            if not (token := page.next_page_token):
                return

    def list_events_page(
        self, page_token: str = "", *, tenant_id: str = "", key_id: str = "", page_size: int = 0
    ) -> key_manager_pb2.ListEventsResponse:
        """One page of the audit trail, newest first, and the ``next_page_token``."""
        request = build.list_events(page_token, tenant_id, key_id, page_size)
        return self._call(self._manager.ListEvents, request)

    def revoke_leaked_keys(
        self, secrets: Iterable[str], *, source: str = "", url: str = ""
    ) -> list[key_manager_pb2.LeakedKeyResult]:
        """Revokes the keys of leaked ``secrets`` (at most 1000) and records ``source`` and
        ``url``; one result per secret, in order: its hint and REVOKED, ALREADY_REVOKED,
        NOT_FOUND (or another tenant's) or MALFORMED."""
        request = build.revoke_leaked_keys(secrets, source, url)
        return list(self._call(self._manager.RevokeLeakedKeys, request).results)
