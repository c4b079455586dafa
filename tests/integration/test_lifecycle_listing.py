"""ListKeys over a real server: name_prefix, include_revoked, order, paging under inserts."""

import threading
from datetime import timedelta

import grpc
import pytest

from apikeys.v1 import api_key_pb2, key_manager_pb2
from apikeys_client import InvalidArgument
from tests.support import RunningServer

MILLISECOND = timedelta(milliseconds=1)


def _names(server: RunningServer, **filters: object) -> list[str]:
    with server.client() as client:
        return [k.name for k in client.list_keys(tenant_id="acme", **filters)]


def _create(server: RunningServer, *names: str, tenant_id: str = "acme") -> list[str]:
    """Creates keys one clock tick apart, so create_time orders them; returns their ids."""
    ids = []
    with server.client() as client:
        for name in names:
            server.clock.advance(MILLISECOND)
            ids.append(client.create_key(name, ["passes:read"], tenant_id=tenant_id).key.id)
    return ids


def _list_page(
    server: RunningServer, channel: grpc.Channel, **fields: object
) -> key_manager_pb2.ListKeysResponse:
    manager, _ = server.stubs(channel)
    fields.setdefault("tenant_id", "acme")
    request = key_manager_pb2.ListKeysRequest(**fields)
    return manager.ListKeys(request, metadata=(("x-api-key", server.admin_key),))


class TestNamePrefix:
    def test_prefix_filters_names(self, server: RunningServer) -> None:
        """Only keys whose name starts with name_prefix are listed."""
        _create(server, "crm-sync-prod", "crm-sync-dev", "billing-prod", "xcrm-sync")
        assert _names(server, name_prefix="crm-sync-") == ["crm-sync-dev", "crm-sync-prod"]
        assert _names(server, name_prefix="crm-sync-prod") == ["crm-sync-prod"]
        assert _names(server, name_prefix="nothing") == []

    def test_underscore_is_literal(self, server: RunningServer) -> None:
        """'_' in a prefix matches only '_' (not any character as in SQL LIKE)."""
        _create(server, "a_b", "axb", "a_", "ab_")
        assert _names(server, name_prefix="a_") == ["a_", "a_b"]

    def test_dot_and_dash_are_literal(self, server: RunningServer) -> None:
        """'.' and '-' in a prefix match only themselves."""
        _create(server, "v1.0-api", "v1x0-api", "v1.0_api")
        assert _names(server, name_prefix="v1.0-") == ["v1.0-api"]

    def test_prefix_is_case_sensitive(self, server: RunningServer) -> None:
        """Prefix matching is case-sensitive on every backend, as names are."""
        _create(server, "crm-sync", "CRM-sync", "Crm-sync")
        assert _names(server, name_prefix="crm") == ["crm-sync"]
        assert _names(server, name_prefix="CRM") == ["CRM-sync"]

    @pytest.mark.parametrize("prefix", ["a%", "%", "a b", "ä"])
    def test_prefix_no_name_can_have_is_invalid_argument(
        self, server: RunningServer, prefix: str
    ) -> None:
        """A prefix with characters names cannot hold ('%' included) is refused, not a wildcard."""
        _create(server, "a_b", "axb")
        with pytest.raises(InvalidArgument) as raised:
            _names(server, name_prefix=prefix)
        assert "name_prefix" in raised.value.details

    def test_prefix_combines_with_include_revoked(self, server: RunningServer) -> None:
        """name_prefix and include_revoked filter together."""
        revoked_id, _, _ = _create(server, "crm-old", "crm-new", "billing")
        with server.client() as client:
            client.revoke_key(revoked_id, tenant_id="acme")
        assert _names(server, name_prefix="crm") == ["crm-new"]
        assert _names(server, name_prefix="crm", include_revoked=True) == ["crm-new", "crm-old"]


class TestStatesAndOrder:
    def test_revoked_listed_only_on_request(self, server: RunningServer) -> None:
        """Revoked keys are left out unless include_revoked; expired keys are always listed."""
        with server.client() as client:
            kept = client.create_key("kept", ["passes:read"], tenant_id="acme")
            server.clock.advance(MILLISECOND)
            gone = client.create_key("gone", ["passes:read"], tenant_id="acme")
            server.clock.advance(MILLISECOND)
            expiring = client.create_key(
                "expiring",
                ["passes:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(minutes=1),
            )
            client.revoke_key(gone.key.id, tenant_id="acme")
            server.clock.advance(timedelta(minutes=2))
            default = {k.id: k.state for k in client.list_keys(tenant_id="acme")}
            assert default == {
                kept.key.id: api_key_pb2.KEY_STATE_ACTIVE,
                expiring.key.id: api_key_pb2.KEY_STATE_EXPIRED,
            }
            everything = {
                k.id: k.state for k in client.list_keys(tenant_id="acme", include_revoked=True)
            }
            assert everything[gone.key.id] == api_key_pb2.KEY_STATE_REVOKED
            assert len(everything) == 3

    def test_newest_first(self, server: RunningServer) -> None:
        """Keys are listed by create_time, newest first, across pages."""
        ids = _create(server, *(f"key-{i}" for i in range(7)))
        with server.client() as client:
            listed = [k.id for k in client.list_keys(tenant_id="acme", page_size=3)]
        assert listed == list(reversed(ids))

    def test_rotated_keys_list_newest_first(self, server: RunningServer) -> None:
        """A rotation's new key lists before the key it replaced."""
        [old_id] = _create(server, "crm-sync-prod")
        server.clock.advance(MILLISECOND)
        with server.client() as client:
            rotated = client.rotate_key(old_id, timedelta(hours=1), tenant_id="acme")
            listed = [k.id for k in client.list_keys(tenant_id="acme")]
        assert listed == [rotated.key.id, old_id]

    def test_other_tenants_keys_are_not_listed(self, server: RunningServer) -> None:
        """ListKeys shows the named tenant's keys only."""
        _create(server, "acme-app")
        _create(server, "globex-app", tenant_id="globex")
        assert _names(server) == ["acme-app"]


class TestPaging:
    def test_pages_cover_every_key_once(self, server: RunningServer) -> None:
        """page_size 2 over 5 keys gives pages of 2, 2, 1 and no token after the last."""
        ids = _create(server, *(f"key-{i}" for i in range(5)))
        seen: list[str] = []
        sizes: list[int] = []
        token = ""
        with server.channel() as channel:
            while True:
                page = _list_page(server, channel, page_size=2, page_token=token)
                seen.extend(k.id for k in page.keys)
                sizes.append(len(page.keys))
                token = page.next_page_token
                if not token:
                    break
        assert sizes == [2, 2, 1]
        assert seen == list(reversed(ids))

    def test_stable_under_concurrent_inserts(self, server: RunningServer) -> None:
        """Keys inserted between pages by another thread never skip or repeat an earlier key."""
        existing = set(_create(server, *(f"key-{i:02}" for i in range(20))))
        created_during: list[str] = []
        progress = threading.Condition()
        stop = threading.Event()
        failures: list[BaseException] = []

        def create_keys() -> None:
            try:
                with server.client() as client:
                    while not stop.is_set():
                        server.clock.advance(MILLISECOND)
                        key = client.create_key("late", ["passes:read"], tenant_id="acme")
                        with progress:
                            created_during.append(key.key.id)
                            progress.notify_all()
            except BaseException as error:  # reported by the main thread
                failures.append(error)
                with progress:
                    progress.notify_all()

        creator = threading.Thread(target=create_keys)
        creator.start()
        seen: list[str] = []
        try:
            with server.channel() as channel:
                token = ""
                while True:
                    with progress:
                        made = len(created_during)
                    page = _list_page(server, channel, page_size=3, page_token=token)
                    seen.extend(k.id for k in page.keys)
                    token = page.next_page_token
                    if not token:
                        break
                    with progress:
                        # At least one insert lands between this page and the next.
                        assert progress.wait_for(
                            lambda made=made: len(created_during) > made or bool(failures),
                            timeout=10,
                        )
        finally:
            stop.set()
            creator.join(timeout=10)
        assert not failures
        assert len(created_during) >= 6
        assert len(seen) == len(set(seen)), "a key was listed twice"
        assert existing <= set(seen), "a key that existed before paging was skipped"
        assert set(seen) <= existing | set(created_during)

    def test_token_survives_a_revocation_of_the_last_key_seen(self, server: RunningServer) -> None:
        """Revoking the key a page ended on does not break or shift the next page."""
        ids = _create(server, *(f"key-{i}" for i in range(4)))
        with server.channel() as channel, server.client() as client:
            first = _list_page(server, channel, page_size=2)
            assert [k.id for k in first.keys] == [ids[3], ids[2]]
            client.revoke_key(ids[2], tenant_id="acme")
            second = _list_page(server, channel, page_size=2, page_token=first.next_page_token)
        assert [k.id for k in second.keys] == [ids[1], ids[0]]
        assert second.next_page_token == ""

    @pytest.mark.parametrize(
        "changed",
        [
            {"include_revoked": True},
            {"name_prefix": "key"},
            {"name_prefix": "key-1"},
            {"tenant_id": "globex"},
        ],
        ids=["include_revoked", "name_prefix", "other_prefix", "tenant"],
    )
    def test_changing_a_filter_between_pages_is_invalid_argument(
        self, server: RunningServer, changed: dict
    ) -> None:
        """A page token only continues the listing it came from."""
        _create(server, *(f"key-{i}" for i in range(3)))
        with server.channel() as channel:
            first = _list_page(server, channel, page_size=1)
            assert first.next_page_token
            with pytest.raises(grpc.RpcError) as raised:
                _list_page(
                    server,
                    channel,
                    page_size=1,
                    page_token=first.next_page_token,
                    **changed,
                )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in raised.value.details()

    def test_page_size_may_change_between_pages(self, server: RunningServer) -> None:
        """page_size is not a filter: a token continues with any page size."""
        ids = _create(server, *(f"key-{i}" for i in range(4)))
        with server.channel() as channel:
            first = _list_page(server, channel, page_size=1)
            rest = _list_page(server, channel, page_size=10, page_token=first.next_page_token)
        assert [k.id for k in (*first.keys, *rest.keys)] == list(reversed(ids))

    def test_events_token_is_not_a_keys_token(self, server: RunningServer) -> None:
        """A ListEvents page token is refused by ListKeys."""
        _create(server, "a", "b")
        with server.channel() as channel:
            manager, _ = server.stubs(channel)
            metadata = (("x-api-key", server.admin_key),)
            events = manager.ListEvents(
                key_manager_pb2.ListEventsRequest(tenant_id="acme", page_size=1),
                metadata=metadata,
            )
            with pytest.raises(grpc.RpcError) as raised:
                _list_page(server, channel, page_token=events.next_page_token)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
