"""RevokeLeakedKeys over a real server, on SQLite and PostgreSQL."""

from datetime import timedelta

import grpc
import pytest

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2
from apikeys_client import InvalidArgument, PermissionDenied
from apikeys_server.domain.manager import MAX_LEAKED_SECRETS
from tests.support import RunningServer, settle

REVOKED = key_manager_pb2.LEAK_OUTCOME_REVOKED
ALREADY_REVOKED = key_manager_pb2.LEAK_OUTCOME_ALREADY_REVOKED
NOT_FOUND = key_manager_pb2.LEAK_OUTCOME_NOT_FOUND
MALFORMED = key_manager_pb2.LEAK_OUTCOME_MALFORMED
SOURCE = "github-secret-scanning"
URL = "https://github.com/acme/app/commit/0123abc"


def _tenant_admin(server: RunningServer, tenant: str) -> str:
    with server.client() as client:
        return client.create_key(
            f"{tenant}-admin", ["apikeys:manage", "apikeys:read"], tenant_id=tenant
        ).secret


def _key(server: RunningServer, tenant: str, name: str = "svc") -> tuple[str, str]:
    with server.client() as client:
        created = client.create_key(name, ["passes:read"], tenant_id=tenant)
    return created.key.id, created.secret


def test_revokes_records_and_stops_verifying(server: RunningServer) -> None:
    """A reported key is revoked at once, records the leak, and has a LEAKED event."""
    key_id, secret = _key(server, "acme")
    with server.client() as client:
        assert client.verify(secret, tenant_id="acme").valid
        server.clock.advance(timedelta(seconds=1))  # events are listed newest first
        [result] = client.revoke_leaked_keys([secret], source=SOURCE, url=URL)
        assert result.outcome == REVOKED
        assert result.key_id == key_id
        assert result.hint == client.get_key(key_id, tenant_id="acme").hint
        assert secret[12:] not in str(result)
        answer = client.verify(secret, tenant_id="acme")
        assert answer.code == key_verifier_pb2.VERIFY_CODE_REVOKED
        key = client.get_key(key_id, tenant_id="acme")
        assert key.state == api_key_pb2.KEY_STATE_REVOKED
        assert key.revoke_reason == "leaked"
        assert key.leak_source == SOURCE
        assert key.leak_url == URL
        assert key.leak_time == key.revoke_time
        [event, _created] = client.list_events(tenant_id="acme", key_id=key_id)
    assert event.action == api_key_pb2.EVENT_ACTION_LEAKED
    assert event.actor_key_id == server.admin_key_id
    changed = {c.field: c.new_value for c in event.changes}
    assert changed["leak_source"] == SOURCE
    assert changed["revoke_reason"] == "leaked"


def test_outcomes_in_order(server: RunningServer) -> None:
    """One result per secret, in order: revoked, already revoked, not found, malformed."""
    _, active = _key(server, "acme", "a")
    gone_id, gone = _key(server, "acme", "b")
    _, unknown = _key(server, "acme", "c")
    with server.client() as client:
        client.revoke_key(gone_id, tenant_id="acme", reason="retired")
    # A well-formed key the service never issued: flip the random part, fix the checksum.
    from apikeys_client.key_pattern import checksum

    body = unknown[:-6][:-1] + ("A" if unknown[-7] != "A" else "B")
    never_issued = body + checksum(body)
    with server.client() as client:
        results = client.revoke_leaked_keys(
            [active, gone, never_issued, "not-a-key", active], source=SOURCE
        )
        assert [r.outcome for r in results] == [
            REVOKED,
            ALREADY_REVOKED,
            NOT_FOUND,
            MALFORMED,
            ALREADY_REVOKED,
        ]
        assert results[3].hint == "" and results[3].key_id == ""
        gone_key = client.get_key(gone_id, tenant_id="acme")
    # An already revoked key keeps its reason and time, and records the leak.
    assert gone_key.revoke_reason == "retired"
    assert gone_key.leak_source == SOURCE


def test_second_report_changes_nothing(server: RunningServer) -> None:
    key_id, secret = _key(server, "acme")
    with server.client() as client:
        client.revoke_leaked_keys([secret], source="first")
        server.clock.advance(timedelta(seconds=5))
        [again] = client.revoke_leaked_keys([secret], source="second")
        assert again.outcome == ALREADY_REVOKED
        key = client.get_key(key_id, tenant_id="acme")
        events = list(client.list_events(tenant_id="acme", key_id=key_id))
    assert key.leak_source == "first"
    assert [e.action for e in events].count(api_key_pb2.EVENT_ACTION_LEAKED) == 1


def test_tenant_key_reaches_its_own_tenant_only(server: RunningServer) -> None:
    """A tenant key revokes its tenant's keys; another tenant's key is NOT_FOUND, untouched."""
    acme_admin = _tenant_admin(server, "acme")
    own_id, own = _key(server, "acme")
    other_id, other = _key(server, "globex")
    with server.client(acme_admin) as client:
        results = client.revoke_leaked_keys([own, other], source=SOURCE)
    assert [r.outcome for r in results] == [REVOKED, NOT_FOUND]
    assert results[1].key_id == ""
    with server.client() as client:
        assert client.verify(other, tenant_id="globex").valid
        assert not client.get_key(other_id, tenant_id="globex").HasField("leak_time")
        assert client.get_key(own_id, tenant_id="acme").HasField("leak_time")


def test_platform_key_reaches_any_tenant(server: RunningServer) -> None:
    _, acme = _key(server, "acme")
    _, globex = _key(server, "globex")
    with server.client() as client:
        results = client.revoke_leaked_keys([acme, globex])
    assert [r.outcome for r in results] == [REVOKED, REVOKED]


def test_needs_manage(server: RunningServer) -> None:
    _, secret = _key(server, "acme")
    with server.client() as client:
        reader = client.create_key("reader", ["apikeys:read"], tenant_id="acme").secret
    with server.client(reader) as client, pytest.raises(PermissionDenied) as raised:
        client.revoke_leaked_keys([secret])
    assert raised.value.reason == "CALLER_LACKS_SCOPE"


def test_at_most_1000_secrets(server: RunningServer) -> None:
    with server.client() as client:
        assert len(client.revoke_leaked_keys(["x"] * MAX_LEAKED_SECRETS)) == MAX_LEAKED_SECRETS
        with pytest.raises(InvalidArgument) as raised:
            client.revoke_leaked_keys(["x"] * (MAX_LEAKED_SECRETS + 1))
    assert raised.value.reason == "TOO_MANY_SECRETS"
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_change_feed_carries_leaked(server: RunningServer) -> None:
    """The feed entry reaches watchers as LEAKED (other processes evict the key)."""
    key_id, secret = _key(server, "acme")
    settle(server)
    with server.client() as client:
        start = client.verify(secret, tenant_id="acme").feed_position
        client.revoke_leaked_keys([secret])
        settle(server)
        stream = client.watch_key_changes(after_position=start, tenant_id="acme", timeout=5)
        kinds = []
        for response in stream:
            kinds += [(c.key_id, c.kind) for c in response.changes]
            if kinds:
                break
        stream.close()  # type: ignore[attr-defined]
    assert (key_id, api_key_pb2.EVENT_ACTION_LEAKED) in kinds
