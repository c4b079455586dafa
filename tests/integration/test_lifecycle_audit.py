"""The audit trail over a real server: one event per change, ListEvents order, paging, isolation."""

from datetime import timedelta

import grpc
import pytest
from sqlalchemy import create_engine, select

from apikeys.v1 import api_key_pb2, key_manager_pb2
from apikeys_client import InvalidArgument, PermissionDenied
from apikeys_server.storage.database import normalise_url
from apikeys_server.storage.models import api_keys, key_events
from tests.support import RunningServer

CREATED = api_key_pb2.EVENT_ACTION_CREATED
UPDATED = api_key_pb2.EVENT_ACTION_UPDATED
ROTATED = api_key_pb2.EVENT_ACTION_ROTATED
REVOKED = api_key_pb2.EVENT_ACTION_REVOKED
SECOND = timedelta(seconds=1)


def _events(server: RunningServer, tenant_id: str = "acme", key_id: str = "") -> list:
    with server.client() as client:
        return list(client.list_events(tenant_id=tenant_id, key_id=key_id))


def _changes(event: api_key_pb2.KeyEvent) -> dict[str, tuple[str, str]]:
    return {c.field: (c.old_value, c.new_value) for c in event.changes}


class TestOneEventPerChange:
    def test_create_writes_created(self, server: RunningServer) -> None:
        """CreateKey writes one CREATED event with the caller, tenant and initial fields."""
        with server.client() as client:
            created = client.create_key(
                "crm-sync-prod", ["passes:write", "passes:read"], tenant_id="acme"
            )
        [event] = _events(server, key_id=created.key.id)
        assert event.action == CREATED
        assert event.key_id == created.key.id
        assert event.tenant_id == "acme"
        assert event.actor_key_id == server.admin_key_id
        assert event.id.startswith("evt_")
        assert event.time == created.key.create_time
        assert _changes(event) == {
            "name": ("", "crm-sync-prod"),
            "scopes": ("", "passes:read passes:write"),
        }

    def test_update_writes_updated_with_old_and_new(self, server: RunningServer) -> None:
        """UpdateKey writes one UPDATED event listing only the fields that changed."""
        with server.client() as client:
            created = client.create_key("crm-sync-dev", ["passes:read"], tenant_id="acme")
            server.clock.advance(SECOND)
            client.update_key(created.key.id, tenant_id="acme", name="crm-sync-prod")
            server.clock.advance(SECOND)
            client.update_key(created.key.id, tenant_id="acme", scopes=["customers:read"])
        events = _events(server, key_id=created.key.id)
        assert [e.action for e in events] == [UPDATED, UPDATED, CREATED]
        assert _changes(events[1]) == {"name": ("crm-sync-dev", "crm-sync-prod")}
        assert _changes(events[0]) == {"scopes": ("passes:read", "customers:read")}
        assert {e.actor_key_id for e in events} == {server.admin_key_id}

    def test_rotate_writes_created_on_new_and_rotated_on_old(self, server: RunningServer) -> None:
        """RotateKey writes CREATED (with rotated_from) on the new key and ROTATED on the old."""
        with server.client() as client:
            old = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            server.clock.advance(SECOND)
            rotated = client.rotate_key(old.key.id, timedelta(hours=1), tenant_id="acme")
        new_events = _events(server, key_id=rotated.key.id)
        assert [e.action for e in new_events] == [CREATED]
        assert _changes(new_events[0])["rotated_from"] == ("", old.key.id)
        assert _changes(new_events[0])["name"] == ("", "crm-sync-prod")

        old_events = _events(server, key_id=old.key.id)
        assert [e.action for e in old_events] == [ROTATED, CREATED]
        rotation = _changes(old_events[0])
        assert rotation["replaced_by"] == ("", rotated.key.id)
        assert rotation["expire_time"][0] == ""
        assert rotation["expire_time"][1] != ""
        assert old_events[0].actor_key_id == server.admin_key_id
        assert new_events[0].actor_key_id == server.admin_key_id

    def test_revoke_writes_one_revoked_and_repeat_writes_none(self, server: RunningServer) -> None:
        """RevokeKey writes one REVOKED event; revoking again is idempotent and writes none."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            server.clock.advance(SECOND)
            client.revoke_key(created.key.id, tenant_id="acme", reason="leaked in CI log")
            server.clock.advance(SECOND)
            again = client.revoke_key(created.key.id, tenant_id="acme", reason="other reason")
            assert again.revoke_reason == "leaked in CI log"
        events = _events(server, key_id=created.key.id)
        assert [e.action for e in events] == [REVOKED, CREATED]
        changes = _changes(events[0])
        assert changes["revoke_reason"] == ("", "leaked in CI log")
        assert changes["revoke_time"][0] == ""

    def test_refused_changes_write_nothing(self, server: RunningServer) -> None:
        """Changes refused with an error leave the trail untouched."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            with pytest.raises(InvalidArgument):
                client.update_key(created.key.id, tenant_id="acme", scopes=["bogus:scope"])
            with pytest.raises(InvalidArgument):
                client.rotate_key(created.key.id, timedelta(days=365), tenant_id="acme")
            with pytest.raises(InvalidArgument):
                client.create_key("bad name", ["passes:read"], tenant_id="acme")
        assert [e.action for e in _events(server)] == [CREATED]

    def test_full_lifecycle_has_one_event_per_changed_key(self, server: RunningServer) -> None:
        """create, update, rotate, revoke: each key's trail has exactly its own changes."""
        with server.client() as client:
            first = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            server.clock.advance(SECOND)
            client.update_key(first.key.id, tenant_id="acme", scopes=["passes:write"])
            server.clock.advance(SECOND)
            second = client.rotate_key(first.key.id, timedelta(0), tenant_id="acme")
            server.clock.advance(SECOND)
            client.revoke_key(second.key.id, tenant_id="acme")
            client.revoke_key(second.key.id, tenant_id="acme")
        per_key: dict[str, list] = {}
        for event in _events(server):
            per_key.setdefault(event.key_id, []).append(event.action)
        assert per_key == {
            first.key.id: [ROTATED, UPDATED, CREATED],
            second.key.id: [REVOKED, CREATED],
        }


class TestActor:
    def test_actor_is_the_calling_tenant_key(self, server: RunningServer) -> None:
        """Changes made with a tenant's manage key name that key as the actor."""
        with server.client() as admin:
            manager = admin.create_key("acme-admin", ["apikeys:manage"], tenant_id="acme")
        with server.client(manager.secret) as client:
            created = client.create_key("crm-sync-prod", ["passes:read"])
            client.update_key(created.key.id, name="crm-sync-live")
            client.revoke_key(created.key.id)
        events = _events(server, key_id=created.key.id)
        assert len(events) == 3
        assert {e.actor_key_id for e in events} == {manager.key.id}
        [own] = _events(server, key_id=manager.key.id)
        assert own.actor_key_id == server.admin_key_id


class TestListEvents:
    def test_newest_first_and_key_filter(self, server: RunningServer) -> None:
        """ListEvents returns the tenant's events newest first; key_id narrows to one key."""
        with server.client() as client:
            a = client.create_key("a", ["passes:read"], tenant_id="acme")
            server.clock.advance(SECOND)
            b = client.create_key("b", ["passes:read"], tenant_id="acme")
            server.clock.advance(SECOND)
            client.update_key(a.key.id, tenant_id="acme", name="a2")
            server.clock.advance(SECOND)
            client.revoke_key(b.key.id, tenant_id="acme")
        events = _events(server)
        assert [(e.key_id, e.action) for e in events] == [
            (b.key.id, REVOKED),
            (a.key.id, UPDATED),
            (b.key.id, CREATED),
            (a.key.id, CREATED),
        ]
        times = [e.time.ToDatetime() for e in events]
        assert times == sorted(times, reverse=True)
        assert [e.action for e in _events(server, key_id=a.key.id)] == [UPDATED, CREATED]

    def test_paging_returns_every_event_once(self, server: RunningServer) -> None:
        """Pages of 3 together equal the unpaged listing, in order, and the last has no token."""
        with server.client() as client:
            key = client.create_key("k0", ["passes:read"], tenant_id="acme")
            for index in range(1, 8):
                server.clock.advance(SECOND)
                client.update_key(key.key.id, tenant_id="acme", name=f"k{index}")
        everything = [e.id for e in _events(server)]
        assert len(everything) == 8
        with server.channel() as channel:
            manager, _ = server.stubs(channel)
            metadata = (("x-api-key", server.admin_key),)
            paged: list[str] = []
            token = ""
            sizes = []
            while True:
                page = manager.ListEvents(
                    key_manager_pb2.ListEventsRequest(
                        tenant_id="acme", page_size=3, page_token=token
                    ),
                    metadata=metadata,
                )
                paged.extend(e.id for e in page.events)
                sizes.append(len(page.events))
                token = page.next_page_token
                if not token:
                    break
        assert paged == everything
        assert sizes == [3, 3, 2]

    def test_changing_key_filter_between_pages_is_invalid_argument(
        self, server: RunningServer
    ) -> None:
        """A page token is bound to its key_id filter and tenant."""
        with server.client() as client:
            key = client.create_key("k", ["passes:read"], tenant_id="acme")
            client.update_key(key.key.id, tenant_id="acme", name="k2")
            client.create_key("k", ["passes:read"], tenant_id="globex")
        with server.channel() as channel:
            manager, _ = server.stubs(channel)
            metadata = (("x-api-key", server.admin_key),)
            first = manager.ListEvents(
                key_manager_pb2.ListEventsRequest(tenant_id="acme", page_size=1),
                metadata=metadata,
            )
            assert first.next_page_token
            for changed in (
                key_manager_pb2.ListEventsRequest(
                    tenant_id="acme", key_id=key.key.id, page_token=first.next_page_token
                ),
                key_manager_pb2.ListEventsRequest(
                    tenant_id="globex", page_token=first.next_page_token
                ),
            ):
                with pytest.raises(grpc.RpcError) as raised:
                    manager.ListEvents(changed, metadata=metadata)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class TestTenantIsolation:
    def test_tenant_key_sees_only_its_tenant(self, server: RunningServer) -> None:
        """A tenant reader lists its own tenant's events and is refused another tenant's."""
        with server.client() as admin:
            mine = admin.create_key("acme-app", ["passes:read"], tenant_id="acme")
            theirs = admin.create_key("globex-app", ["passes:read"], tenant_id="globex")
            reader = admin.create_key("acme-reader", ["apikeys:read"], tenant_id="acme")
        with server.client(reader.secret) as client:
            seen = list(client.list_events())
            assert {e.tenant_id for e in seen} == {"acme"}
            assert {e.key_id for e in seen} == {mine.key.id, reader.key.id}
            assert list(client.list_events(key_id=theirs.key.id)) == []
            with pytest.raises(PermissionDenied):
                list(client.list_events(tenant_id="globex"))

    def test_platform_key_sees_the_named_tenant_only(self, server: RunningServer) -> None:
        """A platform key names a tenant and gets that tenant's events and no other's."""
        with server.client() as client:
            client.create_key("acme-app", ["passes:read"], tenant_id="acme")
            theirs = client.create_key("globex-app", ["passes:read"], tenant_id="globex")
        assert [e.key_id for e in _events(server, tenant_id="globex")] == [theirs.key.id]
        assert theirs.key.id not in {e.key_id for e in _events(server, tenant_id="acme")}

    def test_list_events_needs_read_scope(self, server: RunningServer) -> None:
        """A key without apikeys:read (even with apikeys:manage) cannot list events."""
        with server.client() as admin:
            writer = admin.create_key("acme-writer", ["apikeys:manage"], tenant_id="acme")
        with server.client(writer.secret) as client, pytest.raises(PermissionDenied):
            list(client.list_events())


class TestNoSecrets:
    def test_event_log_never_contains_a_secret(self, server: RunningServer) -> None:
        """Neither ListEvents nor the key_events table holds any secret or its random part."""
        secrets = [server.admin_key]
        with server.client() as client:
            first = client.create_key(
                "crm-sync-prod",
                ["passes:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(days=1),
            )
            secrets.append(first.secret)
            manager = client.create_key("acme-admin", ["apikeys:manage"], tenant_id="acme")
            secrets.append(manager.secret)
            client.update_key(first.key.id, tenant_id="acme", name="crm-sync-live")
            rotated = client.rotate_key(first.key.id, timedelta(hours=1), tenant_id="acme")
            secrets.append(rotated.secret)
            other = client.create_key("globex-app", ["passes:read"], tenant_id="globex")
            secrets.append(other.secret)
            client.revoke_key(other.key.id, tenant_id="globex", reason="rotated by hand")
        with server.client(manager.secret) as tenant_client:
            made = tenant_client.create_key("made-by-tenant", ["customers:read"])
            secrets.append(made.secret)
            secrets.append(tenant_client.rotate_key(made.key.id, timedelta(0)).secret)

        events = [e for tenant in ("acme", "globex", "_platform") for e in _events(server, tenant)]
        assert len(events) == 11
        over_the_wire = b"".join(e.SerializeToString() for e in events)
        as_text = "".join(str(e) for e in events)

        engine = create_engine(normalise_url(server.app.settings.database_url))
        try:
            with engine.connect() as connection:
                rows = connection.execute(select(key_events)).all()
                hints = connection.execute(select(api_keys.c.hint)).scalars().all()
        finally:
            engine.dispose()
        in_table = repr(rows)
        assert len(rows) == len(events)

        for secret in secrets:
            random_part = secret.split("_", 1)[1][:32]
            for needle in (secret, random_part):
                assert needle.encode() not in over_the_wire
                assert needle not in as_text
                assert needle not in in_table
        for hint in hints:
            assert hint.rstrip("…") not in in_table
