"""Both clients' channel: the asyncio client, retries of UNAVAILABLE (idempotent calls only),
round robin over several addresses, against real servers."""

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from apikeys.v1 import key_manager_pb2, key_verifier_pb2
from apikeys_client import (
    ApiKeysClient,
    AsyncApiKeysClient,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from apikeys_client._requests import channel_target
from tests.e2e.conftest import free_port
from tests.support import RunningServer, running_server, server_settings

VALID = key_verifier_pb2.VERIFY_CODE_VALID


class FlakyServer:
    """A real gRPC server for the apikeys methods that answers UNAVAILABLE to the first
    ``failures`` attempts of each method, counting every attempt it receives."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "Verify": grpc.unary_unary_rpc_method_handler(
                self._handle("Verify", key_verifier_pb2.VerifyResponse(valid=True, code=VALID)),
                request_deserializer=key_verifier_pb2.VerifyRequest.FromString,
                response_serializer=key_verifier_pb2.VerifyResponse.SerializeToString,
            )
        }
        manager = {
            "CreateKey": grpc.unary_unary_rpc_method_handler(
                self._handle("CreateKey", key_manager_pb2.CreateKeyResponse(secret="s")),
                request_deserializer=key_manager_pb2.CreateKeyRequest.FromString,
                response_serializer=key_manager_pb2.CreateKeyResponse.SerializeToString,
            )
        }
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler("apikeys.v1.KeyVerifier", handlers),
                grpc.method_handlers_generic_handler("apikeys.v1.KeyManager", manager),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _handle(self, name: str, answer: Any) -> Any:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            with self._lock:
                self.attempts[name] = self.attempts.get(name, 0) + 1
                count = self.attempts[name]
            if count <= self.failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return answer

        return handler


@pytest.fixture
def flaky() -> Iterator[FlakyServer]:
    server = FlakyServer(failures=2)
    server.server.start()
    yield server
    server.server.stop(None)


class TestRetries:
    def test_verify_is_retried_on_unavailable(self, flaky: FlakyServer) -> None:
        """Two UNAVAILABLE answers, then VALID: the sync client sees only VALID."""
        with ApiKeysClient(f"127.0.0.1:{flaky.port}", "k") as client:
            assert client.verify("key").code == VALID
        assert flaky.attempts["Verify"] == 3

    def test_create_key_is_never_retried(self, flaky: FlakyServer) -> None:
        """CreateKey is not idempotent: its UNAVAILABLE reaches the caller after one attempt."""
        with ApiKeysClient(f"127.0.0.1:{flaky.port}", "k") as client, pytest.raises(Unavailable):
            client.create_key("svc", ["passes:read"], tenant_id="acme")
        assert flaky.attempts["CreateKey"] == 1

    def test_async_client_retries_the_same(self, flaky: FlakyServer) -> None:
        async def run() -> None:
            async with AsyncApiKeysClient(f"127.0.0.1:{flaky.port}", "k") as client:
                assert (await client.verify("key")).code == VALID
                with pytest.raises(Unavailable):
                    await client.create_key("svc", ["passes:read"], tenant_id="acme")

        asyncio.run(run())
        assert flaky.attempts == {"Verify": 3, "CreateKey": 1}

    def test_retries_off(self, flaky: FlakyServer) -> None:
        with (
            ApiKeysClient(f"127.0.0.1:{flaky.port}", "k", retries=False) as client,
            pytest.raises(Unavailable),
        ):
            client.verify("key")
        assert flaky.attempts["Verify"] == 1


class TestRestartedServer:
    @pytest.mark.parametrize("retries", [True, False])
    def test_verify_rides_over_a_restart_create_key_does_not(
        self, tmp_path: Path, retries: bool
    ) -> None:
        """The apikeys server stops and starts again on the same port (same database) 0.1 s
        later: a Verify made while it is down succeeds through retries; a CreateKey made while
        it is down fails with Unavailable (never retried). Control: without retries, the
        Verify fails too."""
        url = f"sqlite:///{tmp_path / 'restart.db'}"
        settings = server_settings(url, listen=f"127.0.0.1:{free_port()}")
        with running_server(settings) as first:
            client = ApiKeysClient(first.target, first.admin_key, timeout=10, retries=retries)
            secret = client.create_key("svc", ["passes:read"], tenant_id="acme").secret
            assert client.verify(secret, tenant_id="acme").code == VALID
        with client:
            with pytest.raises(Unavailable):
                client.create_key("svc", ["passes:read"], tenant_id="acme")
            restarted = threading.Event()

            def restart() -> None:
                time.sleep(0.1)
                with running_server(settings):
                    restarted.set()
                    time.sleep(3)

            thread = threading.Thread(target=restart)
            thread.start()
            try:
                if retries:
                    assert client.verify(secret, tenant_id="acme").code == VALID
                    assert restarted.is_set()
                else:
                    with pytest.raises(Unavailable):
                        client.verify(secret, tenant_id="acme")
            finally:
                thread.join()


def _count_verifies(server: RunningServer) -> list[int]:
    """Counts the Verify calls this server's servicer makes into its domain Verifier."""
    verifier = server.app.services.verifier
    count = [0]
    original = verifier.verify

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    verifier.verify = counting  # type: ignore[method-assign]
    return count


class TestRoundRobin:
    def test_calls_spread_over_two_servers_on_one_database(self, tmp_path: Path) -> None:
        """A target listing two servers over one database: each serves about half the calls."""
        url = f"sqlite:///{tmp_path / 'shared.db'}"
        with (
            running_server(server_settings(url)) as first,
            running_server(server_settings(url)) as second,
        ):
            counts = (_count_verifies(first), _count_verifies(second))
            target = f"{first.target},{second.target}"
            with ApiKeysClient(target, first.admin_key, timeout=10) as client:
                created = client.create_key("svc", ["passes:read"], tenant_id="acme")
                answers = [
                    client.verify(created.secret, ["passes:read"], tenant_id="acme")
                    for _ in range(40)
                ]
        assert all(answer.code == VALID for answer in answers)
        assert counts[0][0] + counts[1][0] == 40
        assert counts[0][0] >= 10 and counts[1][0] >= 10, counts

    def test_a_dead_address_is_skipped(self, server: RunningServer) -> None:
        """One address of the list refuses connections: every Verify still succeeds."""
        target = f"127.0.0.1:{free_port()},{server.target}"
        with ApiKeysClient(target, server.admin_key, timeout=10) as client:
            for _ in range(10):
                assert client.verify("nope", tenant_id="acme").code != VALID


class TestTargets:
    def test_lists_become_ipv4_or_ipv6_targets(self) -> None:
        assert channel_target("10.0.0.1:1,10.0.0.2:2") == ("ipv4:10.0.0.1:1,10.0.0.2:2", None)
        assert channel_target("[::1]:1,[::1]:2") == ("ipv6:[::1]:1,[::1]:2", None)
        resolved, authority = channel_target("localhost:1,127.0.0.1:2")
        assert resolved.startswith(("ipv4:", "ipv6:"))
        assert authority == "localhost:1"
        assert channel_target("dns:///apikeys:50051") == ("dns:///apikeys:50051", None)
        with pytest.raises(ValueError):
            channel_target("a,b")


class TestAsyncClient:
    def test_same_methods_and_typed_errors(self, server: RunningServer) -> None:
        """The asyncio client creates, verifies, lists, watches; errors are the typed ones."""

        async def run() -> None:
            async with AsyncApiKeysClient(server.target, server.admin_key, timeout=10) as client:
                created = await client.create_key("svc", ["passes:read"], tenant_id="acme")
                answer = await client.verify(created.secret, ["passes:read"], tenant_id="acme")
                assert answer.code == VALID and answer.key_id == created.key.id
                assert (await client.get_key(created.key.id, tenant_id="acme")) == created.key
                ids = [key.id async for key in client.list_keys(tenant_id="acme", page_size=1)]
                assert ids == [created.key.id]
                assert await client.list_scopes()
                with pytest.raises(NotFound) as missing:
                    await client.get_key("key_" + "0" * 26, tenant_id="acme")
                assert missing.value.reason == "KEY_NOT_FOUND"
                with pytest.raises(InvalidArgument) as bad:
                    await client.create_key("svc", ["passes:wirte"], tenant_id="acme")
                assert bad.value.reason == "SCOPE_NOT_IN_CATALOG"
                assert bad.value.field_violations[0][0] == "scopes[0]"
                stream = client.watch_key_changes(tenant_id="acme")
                first = await anext(stream)  # a heartbeat within a second
                await client.revoke_key(created.key.id, tenant_id="acme")
                seen = first.position
                async for message in stream:
                    if any(c.key_id == created.key.id for c in message.changes):
                        break
                    seen = message.position
                await stream.aclose()
                assert seen >= first.position
                events = [e async for e in client.list_events(tenant_id="acme")]
                assert events

        asyncio.run(run())


class TestPages:
    def test_one_page_at_a_time_with_its_token(self, server: RunningServer) -> None:
        """list_keys_page / list_events_page (both clients): a page and the token to the next,
        the same keys and events as the lazy iterators, newest first."""
        with server.client() as client:
            made = [
                client.create_key(f"p-{i}", ["passes:read"], tenant_id="acme") for i in range(3)
            ]
            first = client.list_keys_page(tenant_id="acme", name_prefix="p-", page_size=2)
            second = client.list_keys_page(
                first.next_page_token, tenant_id="acme", name_prefix="p-", page_size=2
            )
            assert [k.id for k in [*first.keys, *second.keys]] == [
                k.id for k in client.list_keys(tenant_id="acme", name_prefix="p-")
            ]
            assert {k.id for k in [*first.keys, *second.keys]} == {m.key.id for m in made}
            assert second.next_page_token == ""
            events = client.list_events_page(tenant_id="acme", page_size=2)
            assert len(events.events) == 2 and events.next_page_token

        async def run() -> tuple[list[str], str]:
            async with AsyncApiKeysClient(server.target, server.admin_key, timeout=10) as aio:
                page = await aio.list_keys_page(tenant_id="acme", name_prefix="p-", page_size=2)
                events = await aio.list_events_page(tenant_id="acme", page_size=2)
                assert [e.id for e in events.events] == [e.id for e in client_events]
                return [k.id for k in page.keys], page.next_page_token

        with server.client() as client:
            client_events = list(client.list_events_page(tenant_id="acme", page_size=2).events)
        ids, token = asyncio.run(run())
        assert ids == [k.id for k in first.keys] and token
