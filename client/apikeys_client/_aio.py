"""The asyncio client over ``grpc.aio``: the same methods, requests, channel options and typed
errors as ``ApiKeysClient`` (built in ``_requests`` and ``_errors``); only the calls differ."""

from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio

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


class AsyncApiKeysClient:
    """``ApiKeysClient`` for asyncio: every method is a coroutine, except ``list_keys``,
    ``list_events`` and ``watch_key_changes``, which are async iterators.

    Use ``async with``, or ``await close()``. Arguments as for ``ApiKeysClient``.
    """

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
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
                grpc.aio.secure_channel(resolved, credentials, options)
                if credentials is not None
                else grpc.aio.insecure_channel(resolved, options)
            )
        self._channel = channel
        self._metadata = build.metadata(api_key)
        self._timeout = timeout
        self._manager = key_manager_pb2_grpc.KeyManagerStub(channel)
        self._verifier = key_verifier_pb2_grpc.KeyVerifierStub(channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # -- Verify ------------------------------------------------------------------------------

    async def verify(
        self, key: str, required_scopes: Iterable[str] = (), *, tenant_id: str = ""
    ) -> key_verifier_pb2.VerifyResponse:
        """Whether ``key`` may make a call needing ``required_scopes``; see ``http_status``."""
        request = build.verify(key, required_scopes, tenant_id)
        response: key_verifier_pb2.VerifyResponse = await self._call(self._verifier.Verify, request)
        return response

    async def watch_key_changes(
        self, after_position: int = 0, *, tenant_id: str = "", timeout: float | None = None
    ) -> AsyncGenerator[key_verifier_pb2.WatchKeyChangesResponse]:
        """As ``ApiKeysClient.watch_key_changes``; closing the iterator cancels the call."""
        request = build.watch_key_changes(after_position, tenant_id)
        call = self._verifier.WatchKeyChanges(request, metadata=self._metadata, timeout=timeout)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    # -- management --------------------------------------------------------------------------

    async def create_key(
        self,
        name: str,
        scopes: Iterable[str],
        *,
        tenant_id: str = "",
        expire_time: datetime | None = None,
        request_id: str | None = None,
    ) -> key_manager_pb2.CreateKeyResponse:
        """As ``ApiKeysClient.create_key`` (``request_id`` makes retries safe)."""
        request = build.create_key(name, scopes, tenant_id, expire_time, request_id)
        response: key_manager_pb2.CreateKeyResponse = await self._call(
            self._manager.CreateKey, request
        )
        return response

    async def get_key(self, key_id: str, *, tenant_id: str = "") -> api_key_pb2.ApiKey:
        key: api_key_pb2.ApiKey = await self._call(
            self._manager.GetKey, build.get_key(key_id, tenant_id)
        )
        return key

    async def list_keys(
        self,
        *,
        tenant_id: str = "",
        include_revoked: bool = False,
        name_prefix: str = "",
        page_size: int = 0,
    ) -> AsyncIterator[api_key_pb2.ApiKey]:
        """Every matching key, newest first, fetching pages lazily."""
        token = ""
        while True:
            request = build.list_keys(token, tenant_id, include_revoked, name_prefix, page_size)
            page = await self._call(self._manager.ListKeys, request)
            for key in page.keys:
                yield key
            if not (token := page.next_page_token):
                return

    async def list_keys_page(
        self,
        page_token: str = "",
        *,
        tenant_id: str = "",
        include_revoked: bool = False,
        name_prefix: str = "",
        page_size: int = 0,
    ) -> key_manager_pb2.ListKeysResponse:
        """As ``ApiKeysClient.list_keys_page``."""
        request = build.list_keys(page_token, tenant_id, include_revoked, name_prefix, page_size)
        response: key_manager_pb2.ListKeysResponse = await self._call(
            self._manager.ListKeys, request
        )
        return response

    async def update_key(
        self,
        key_id: str,
        *,
        tenant_id: str = "",
        name: str | None = None,
        scopes: Iterable[str] | None = None,
    ) -> api_key_pb2.ApiKey:
        request = build.update_key(key_id, tenant_id, name, scopes)
        key: api_key_pb2.ApiKey = await self._call(self._manager.UpdateKey, request)
        return key

    async def rotate_key(
        self,
        key_id: str,
        overlap: timedelta,
        *,
        tenant_id: str = "",
        request_id: str | None = None,
    ) -> key_manager_pb2.RotateKeyResponse:
        request = build.rotate_key(key_id, overlap, tenant_id, request_id)
        response: key_manager_pb2.RotateKeyResponse = await self._call(
            self._manager.RotateKey, request
        )
        return response

    async def revoke_key(
        self, key_id: str, *, tenant_id: str = "", reason: str = ""
    ) -> api_key_pb2.ApiKey:
        request = build.revoke_key(key_id, tenant_id, reason)
        key: api_key_pb2.ApiKey = await self._call(self._manager.RevokeKey, request)
        return key

    async def revoke_leaked_keys(
        self, secrets: Iterable[str], *, source: str = "", url: str = ""
    ) -> list[key_manager_pb2.LeakedKeyResult]:
        """As ``ApiKeysClient.revoke_leaked_keys``."""
        request = build.revoke_leaked_keys(secrets, source, url)
        response = await self._call(self._manager.RevokeLeakedKeys, request)
        return list(response.results)

    async def list_scopes(self) -> list[api_key_pb2.Scope]:
        response = await self._call(self._manager.ListScopes, build.list_scopes())
        return list(response.scopes)

    async def list_events_page(
        self, page_token: str = "", *, tenant_id: str = "", key_id: str = "", page_size: int = 0
    ) -> key_manager_pb2.ListEventsResponse:
        """As ``ApiKeysClient.list_events_page``."""
        request = build.list_events(page_token, tenant_id, key_id, page_size)
        response: key_manager_pb2.ListEventsResponse = await self._call(
            self._manager.ListEvents, request
        )
        return response

    async def list_events(
        self, *, tenant_id: str = "", key_id: str = "", page_size: int = 0
    ) -> AsyncIterator[api_key_pb2.KeyEvent]:
        """The audit trail, newest first, fetching pages lazily."""
        token = ""
        while True:
            request = build.list_events(token, tenant_id, key_id, page_size)
            page = await self._call(self._manager.ListEvents, request)
            for event in page.events:
                yield event
            if not (token := page.next_page_token):
                return
