"""KeyManager over a real in-process gRPC server, on SQLite and PostgreSQL.

Covers CreateKey, GetKey, ListKeys (AIP-158 paging), RevokeKey and ListScopes; the rest of
the lifecycle (update, rotate, expiry, last used, audit) is tested in its own module.
"""

import hashlib
import os
from datetime import UTC, timedelta

import grpc
import pytest
from google.protobuf.message import Message

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2
from apikeys_client import InvalidArgument, NotFound
from apikeys_server.domain.key_format import KeyFormat
from apikeys_server.domain.manager import new_id
from apikeys_server.domain.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from apikeys_server.domain.records import KeyRecord
from tests.support import RunningServer

TENANT = "acme"


def _metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


def _assert_no_secret(message: Message, *secrets: str) -> None:
    """The serialized bytes of a response hold no secret, nor 8 chars running of its random part.

    (The hint shows the first 4 random characters, on purpose.)
    """
    raw = message.SerializeToString()
    for secret in secrets:
        random_part = secret.split("_")[-1][:32]
        assert secret.encode() not in raw
        for start in range(len(random_part) - 7):
            assert random_part[start : start + 8].encode() not in raw


def _list_page(
    server: RunningServer, channel: grpc.Channel, **fields: object
) -> key_manager_pb2.ListKeysResponse:
    manager, _ = server.stubs(channel)
    request = key_manager_pb2.ListKeysRequest(**fields)  # type: ignore[arg-type]
    return manager.ListKeys(request, metadata=_metadata(server.admin_key), timeout=10)


def _list_code(server: RunningServer, channel: grpc.Channel, **fields: object) -> grpc.StatusCode:
    try:
        _list_page(server, channel, **fields)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _bulk_insert(server: RunningServer, tenant: str, count: int) -> None:
    """Inserts keys straight through the store: faster than CreateKey for paging limits."""
    now = server.clock.now()
    with server.app.services.store.transaction() as tx:
        for index in range(count):
            tx.insert_key(
                KeyRecord(
                    id=new_id("key"),
                    tenant_id=tenant,
                    name=f"bulk-{index}",
                    scopes=frozenset({"passes:read"}),
                    hint="ak_bulk…",
                    digest=hashlib.sha256(os.urandom(16)).digest(),
                    create_time=now - timedelta(seconds=index),
                )
            )


class TestCreateKey:
    def test_returns_an_active_key_and_its_secret_once(self, server: RunningServer) -> None:
        """CreateKey answers the secret and an ACTIVE key with hint, sorted scopes, create time."""
        with server.client() as client:
            created = client.create_key(
                "crm-sync-prod", ["passes:write", "passes:read"], tenant_id=TENANT
            )
        secret = created.secret
        assert KeyFormat("ak").is_well_formed(secret)
        key = created.key
        assert key.id.startswith("key_")
        assert key.tenant_id == TENANT
        assert key.name == "crm-sync-prod"
        assert list(key.scopes) == ["passes:read", "passes:write"]
        assert key.state == api_key_pb2.KEY_STATE_ACTIVE
        assert key.create_time.ToDatetime(tzinfo=UTC) == server.clock.now()
        assert not key.HasField("expire_time")
        assert not key.HasField("revoke_time")
        assert not key.HasField("last_used_time")
        assert key.hint == secret[: len("ak_") + 4] + "…"
        _assert_no_secret(key, secret)

    def test_keeps_the_requested_expire_time(self, server: RunningServer) -> None:
        """An expire_time in the future is stored and echoed back as given."""
        expire = server.clock.now() + timedelta(days=30, microseconds=123456)
        with server.client() as client:
            created = client.create_key(
                "job", ["passes:read"], tenant_id=TENANT, expire_time=expire
            )
            fetched = client.get_key(created.key.id, tenant_id=TENANT)
        assert created.key.expire_time.ToDatetime(tzinfo=UTC) == expire
        assert fetched.expire_time == created.key.expire_time
        assert fetched.state == api_key_pb2.KEY_STATE_ACTIVE

    def test_every_key_gets_its_own_id_and_secret(self, server: RunningServer) -> None:
        """Keys created with the same name and scopes never share an id or a secret."""
        with server.client() as client:
            created = [
                client.create_key("same", ["passes:read"], tenant_id=TENANT) for _ in "abcde"
            ]
        assert len({c.key.id for c in created}) == 5
        assert len({c.secret for c in created}) == 5
        assert len({c.key.hint for c in created}) >= 2


class TestSecretNeverReturnedAgain:
    def test_no_response_after_create_carries_the_secret(self, server: RunningServer) -> None:
        """GetKey, ListKeys, RevokeKey and Verify responses never contain the secret bytes."""
        with server.client() as client:
            created = [
                client.create_key(f"svc-{i}", ["passes:read"], tenant_id=TENANT) for i in range(3)
            ]
            secrets = [c.secret for c in created] + [server.admin_key]
        with server.channel() as channel:
            manager, verifier = server.stubs(channel)
            metadata = _metadata(server.admin_key)
            responses: list[Message] = []
            for c in created:
                responses.append(
                    manager.GetKey(
                        key_manager_pb2.GetKeyRequest(tenant_id=TENANT, key_id=c.key.id),
                        metadata=metadata,
                    )
                )
            responses.append(
                manager.RevokeKey(
                    key_manager_pb2.RevokeKeyRequest(tenant_id=TENANT, key_id=created[0].key.id),
                    metadata=metadata,
                )
            )
            for include_revoked in (False, True):
                responses.append(
                    manager.ListKeys(
                        key_manager_pb2.ListKeysRequest(
                            tenant_id=TENANT, include_revoked=include_revoked
                        ),
                        metadata=metadata,
                    )
                )
            responses.append(
                manager.ListKeys(
                    key_manager_pb2.ListKeysRequest(tenant_id="_platform"), metadata=metadata
                )
            )
            for c in created:
                responses.append(
                    verifier.Verify(
                        key_verifier_pb2.VerifyRequest(key=c.secret, tenant_id=TENANT),
                        metadata=metadata,
                    )
                )
        assert len(responses) == 10
        for response in responses:
            _assert_no_secret(response, *secrets)


class TestGetKey:
    def test_returns_the_created_key(self, server: RunningServer) -> None:
        """GetKey answers the same ApiKey that CreateKey returned."""
        with server.client() as client:
            created = client.create_key("reader", ["customers:read"], tenant_id=TENANT)
            fetched = client.get_key(created.key.id, tenant_id=TENANT)
        assert fetched == created.key

    def test_unknown_id_is_not_found(self, server: RunningServer) -> None:
        """A well-formed id that names no key answers NOT_FOUND."""
        with server.client() as client, pytest.raises(NotFound):
            client.get_key("key_doesnotexist", tenant_id=TENANT)

    def test_key_of_another_tenant_is_not_found(self, server: RunningServer) -> None:
        """Asking for a key under the wrong tenant answers NOT_FOUND, even for a platform key."""
        with server.client() as client:
            created = client.create_key("reader", ["customers:read"], tenant_id="globex")
            with pytest.raises(NotFound):
                client.get_key(created.key.id, tenant_id=TENANT)


class TestListKeys:
    def test_newest_first_with_ties_broken_by_id(self, server: RunningServer) -> None:
        """Keys list by create_time descending; keys created in the same instant by id desc."""
        ids_by_time = []
        with server.client() as client:
            for step in range(3):
                same_instant = [
                    client.create_key(f"k-{step}-{i}", ["passes:read"], tenant_id=TENANT).key.id
                    for i in range(2)
                ]
                ids_by_time.append(sorted(same_instant, reverse=True))
                server.clock.advance(timedelta(seconds=1))
            listed = [key.id for key in client.list_keys(tenant_id=TENANT)]
        expected = [key_id for group in reversed(ids_by_time) for key_id in group]
        assert listed == expected

    def test_pages_have_no_duplicates_and_no_gaps(self, server: RunningServer) -> None:
        """Seven keys in pages of three: 3, 3, 1, then an empty token, every key exactly once."""
        with server.client() as client:
            for i in range(7):
                client.create_key(f"k-{i}", ["passes:read"], tenant_id=TENANT)
                if i % 2:
                    server.clock.advance(timedelta(milliseconds=1))
            everything = [key.id for key in client.list_keys(tenant_id=TENANT)]
        pages = []
        token = ""
        with server.channel() as channel:
            while True:
                page = _list_page(server, channel, tenant_id=TENANT, page_size=3, page_token=token)
                pages.append([key.id for key in page.keys])
                token = page.next_page_token
                if not token:
                    break
        assert [len(page) for page in pages] == [3, 3, 1]
        assert [key_id for page in pages for key_id in page] == everything
        assert len(set(everything)) == 7

    def test_exact_multiple_ends_with_an_empty_token(self, server: RunningServer) -> None:
        """Six keys in pages of three: the second page already has an empty next_page_token."""
        with server.client() as client:
            for i in range(6):
                client.create_key(f"k-{i}", ["passes:read"], tenant_id=TENANT)
        with server.channel() as channel:
            first = _list_page(server, channel, tenant_id=TENANT, page_size=3)
            second = _list_page(
                server, channel, tenant_id=TENANT, page_size=3, page_token=first.next_page_token
            )
        assert first.next_page_token
        assert len(second.keys) == 3
        assert second.next_page_token == ""

    def test_keys_created_between_pages_do_not_shift_later_pages(
        self, server: RunningServer
    ) -> None:
        """A key created after the first page is fetched neither duplicates nor skips any key."""
        with server.client() as client:
            for i in range(4):
                client.create_key(f"k-{i}", ["passes:read"], tenant_id=TENANT)
            before = [key.id for key in client.list_keys(tenant_id=TENANT)]
            with server.channel() as channel:
                first = _list_page(server, channel, tenant_id=TENANT, page_size=2)
                server.clock.advance(timedelta(seconds=1))
                client.create_key("late", ["passes:read"], tenant_id=TENANT)
                second = _list_page(
                    server,
                    channel,
                    tenant_id=TENANT,
                    page_size=2,
                    page_token=first.next_page_token,
                )
        assert [k.id for k in first.keys] + [k.id for k in second.keys] == before
        assert second.next_page_token == ""

    def test_page_size_zero_means_default_and_large_sizes_are_clamped(
        self, server: RunningServer
    ) -> None:
        """page_size 0 gives the default (50); a huge page_size gives at most the maximum (1000)."""
        _bulk_insert(server, "bulk", MAX_PAGE_SIZE + 1)
        with server.channel() as channel:
            default = _list_page(server, channel, tenant_id="bulk")
            clamped = _list_page(server, channel, tenant_id="bulk", page_size=2**31 - 1)
            rest = _list_page(
                server,
                channel,
                tenant_id="bulk",
                page_size=2**31 - 1,
                page_token=clamped.next_page_token,
            )
        assert len(default.keys) == DEFAULT_PAGE_SIZE
        assert default.next_page_token
        assert len(clamped.keys) == MAX_PAGE_SIZE
        assert clamped.next_page_token
        assert len(rest.keys) == 1
        assert rest.next_page_token == ""
        assert len({k.id for k in clamped.keys} | {k.id for k in rest.keys}) == MAX_PAGE_SIZE + 1

    def test_negative_page_size_is_invalid(self, server: RunningServer) -> None:
        """A negative page_size answers INVALID_ARGUMENT."""
        with server.channel() as channel:
            assert (
                _list_code(server, channel, tenant_id=TENANT, page_size=-1)
                == grpc.StatusCode.INVALID_ARGUMENT
            )

    def test_forged_token_is_invalid(self, server: RunningServer) -> None:
        """A token the server never issued, or a truncated one, answers INVALID_ARGUMENT."""
        with server.client() as client:
            for i in range(3):
                client.create_key(f"k-{i}", ["passes:read"], tenant_id=TENANT)
        with server.channel() as channel:
            token = _list_page(server, channel, tenant_id=TENANT, page_size=1).next_page_token
            assert token
            for forged in ("not-a-token", "eyJ4Ijp7fX0", token[: len(token) // 2], "%%%"):
                assert (
                    _list_code(server, channel, tenant_id=TENANT, page_token=forged)
                    == grpc.StatusCode.INVALID_ARGUMENT
                ), forged

    def test_token_is_bound_to_tenant_and_filters(self, server: RunningServer) -> None:
        """Reusing a token with another tenant or another include_revoked is INVALID_ARGUMENT."""
        with server.client() as client:
            for tenant in (TENANT, "globex"):
                for i in range(3):
                    client.create_key(f"k-{i}", ["passes:read"], tenant_id=tenant)
        with server.channel() as channel:
            token = _list_page(server, channel, tenant_id=TENANT, page_size=1).next_page_token
            assert token
            assert (
                _list_code(server, channel, tenant_id="globex", page_size=1, page_token=token)
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            assert (
                _list_code(
                    server,
                    channel,
                    tenant_id=TENANT,
                    page_size=1,
                    page_token=token,
                    include_revoked=True,
                )
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            # The same token with the same query keeps working; page_size may change.
            assert (
                _list_code(server, channel, tenant_id=TENANT, page_size=5, page_token=token)
                == grpc.StatusCode.OK
            )

    def test_only_the_tenants_own_keys_are_listed(self, server: RunningServer) -> None:
        """ListKeys for one tenant never shows another tenant's keys."""
        with server.client() as client:
            mine = {client.create_key("mine", ["passes:read"], tenant_id=TENANT).key.id}
            client.create_key("theirs", ["passes:read"], tenant_id="globex")
            listed = {key.id for key in client.list_keys(tenant_id=TENANT)}
        assert listed == mine

    def test_empty_tenant_lists_nothing(self, server: RunningServer) -> None:
        """A tenant without keys gets an empty page and an empty token."""
        with server.channel() as channel:
            page = _list_page(server, channel, tenant_id="nobody")
        assert list(page.keys) == []
        assert page.next_page_token == ""

    def test_revoked_keys_only_with_include_revoked(self, server: RunningServer) -> None:
        """Revoked keys are left out by default and listed, as REVOKED, with include_revoked."""
        with server.client() as client:
            kept = client.create_key("kept", ["passes:read"], tenant_id=TENANT).key
            gone = client.create_key("gone", ["passes:read"], tenant_id=TENANT).key
            client.revoke_key(gone.id, tenant_id=TENANT)
            default = {key.id: key for key in client.list_keys(tenant_id=TENANT)}
            everything = {
                key.id: key for key in client.list_keys(tenant_id=TENANT, include_revoked=True)
            }
        assert set(default) == {kept.id}
        assert set(everything) == {kept.id, gone.id}
        assert everything[gone.id].state == api_key_pb2.KEY_STATE_REVOKED
        assert everything[kept.id].state == api_key_pb2.KEY_STATE_ACTIVE

    def test_include_revoked_pages_cover_every_key(self, server: RunningServer) -> None:
        """Paging with include_revoked walks revoked and active keys alike, each once."""
        with server.client() as client:
            ids = []
            for i in range(5):
                key = client.create_key(f"k-{i}", ["passes:read"], tenant_id=TENANT).key
                ids.append(key.id)
                if i % 2 == 0:
                    client.revoke_key(key.id, tenant_id=TENANT)
            listed = [
                key.id
                for key in client.list_keys(tenant_id=TENANT, include_revoked=True, page_size=2)
            ]
        assert sorted(listed) == sorted(ids)
        assert len(listed) == 5


class TestRevokeKey:
    def test_revoke_marks_the_key_revoked(self, server: RunningServer) -> None:
        """RevokeKey answers the key REVOKED with revoke_time and reason; GetKey agrees."""
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
            server.clock.advance(timedelta(minutes=5))
            revoked = client.revoke_key(created.key.id, tenant_id=TENANT, reason="leaked in CI")
            fetched = client.get_key(created.key.id, tenant_id=TENANT)
        assert revoked.state == api_key_pb2.KEY_STATE_REVOKED
        assert revoked.revoke_time.ToDatetime(tzinfo=UTC) == server.clock.now()
        assert revoked.revoke_reason == "leaked in CI"
        assert fetched == revoked

    def test_revoke_is_idempotent(self, server: RunningServer) -> None:
        """A second RevokeKey is OK and changes nothing: same revoke_time, same reason."""
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
            first = client.revoke_key(created.key.id, tenant_id=TENANT, reason="first")
            server.clock.advance(timedelta(hours=1))
            second = client.revoke_key(created.key.id, tenant_id=TENANT, reason="second")
        assert second.state == api_key_pb2.KEY_STATE_REVOKED
        assert second.revoke_time == first.revoke_time
        assert second.revoke_reason == "first"
        assert second == first

    def test_unknown_key_is_not_found(self, server: RunningServer) -> None:
        """Revoking a key id that does not exist answers NOT_FOUND."""
        with server.client() as client, pytest.raises(NotFound):
            client.revoke_key("key_doesnotexist", tenant_id=TENANT)

    def test_revoking_one_key_leaves_the_others_active(self, server: RunningServer) -> None:
        """Only the named key is revoked."""
        with server.client() as client:
            one = client.create_key("one", ["passes:read"], tenant_id=TENANT)
            two = client.create_key("two", ["passes:read"], tenant_id=TENANT)
            client.revoke_key(one.key.id, tenant_id=TENANT)
            assert client.get_key(two.key.id, tenant_id=TENANT).state == (
                api_key_pb2.KEY_STATE_ACTIVE
            )
            assert client.verify(two.secret, tenant_id=TENANT).valid


class TestListScopes:
    def test_returns_the_catalog(self, server: RunningServer) -> None:
        """ListScopes answers the built-in catalog plus the reserved scopes, each described."""
        with server.client() as client:
            scopes = client.list_scopes()
        names = [scope.name for scope in scopes]
        assert set(names) >= {
            "passes:read",
            "passes:write",
            "customers:read",
            "customers:write",
            "apikeys:manage",
            "apikeys:read",
            "apikeys:verify",
        }
        assert len(names) == len(set(names))
        assert all(scope.description for scope in scopes)

    def test_every_listed_scope_can_be_granted(self, server: RunningServer) -> None:
        """A key may be created with every scope the catalog lists, and with nothing else."""
        with server.client() as client:
            names = [scope.name for scope in client.list_scopes()]
            created = client.create_key("all", names, tenant_id=TENANT)
            assert sorted(created.key.scopes) == sorted(names)
            with pytest.raises(InvalidArgument, match="passes:delete"):
                client.create_key("more", [*names, "passes:delete"], tenant_id=TENANT)
