"""Expiry over a real server: expire_time at creation, EXPIRED at once even from the cache."""

from collections.abc import Iterator
from datetime import UTC, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2
from apikeys_client import InvalidArgument, Unauthenticated
from apikeys_server.domain.key_format import digest
from apikeys_server.domain.records import VerifyRecord
from tests.support import FakeClock, RunningServer, running_server, server_settings

VALID = key_verifier_pb2.VERIFY_CODE_VALID
EXPIRED = key_verifier_pb2.VERIFY_CODE_EXPIRED
MICROSECOND = timedelta(microseconds=1)


@pytest.fixture
def cached_server(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    """A server whose Verify cache would keep entries for an hour unless evicted."""
    settings = server_settings(database_url, cache_ttl_seconds=3600.0)
    with running_server(settings, clock) as running:
        yield running


class TestExpireTimeAtCreation:
    @pytest.mark.parametrize(
        "offset",
        [timedelta(0), -MICROSECOND, -timedelta(days=1)],
        ids=["now", "1us-ago", "yesterday"],
    )
    def test_not_in_the_future_is_invalid_argument(
        self, server: RunningServer, offset: timedelta
    ) -> None:
        """expire_time at or before now is refused and no key is created."""
        with server.client() as client:
            with pytest.raises(InvalidArgument) as raised:
                client.create_key(
                    "crm-sync-prod",
                    ["passes:read"],
                    tenant_id="acme",
                    expire_time=server.clock.now() + offset,
                )
            assert "expire_time" in raised.value.details
            assert list(client.list_keys(tenant_id="acme")) == []

    def test_future_expire_time_is_kept_exactly(self, server: RunningServer) -> None:
        """A key created to expire 1 µs from now is ACTIVE with exactly that expire_time."""
        with server.client() as client:
            end = server.clock.now() + MICROSECOND
            created = client.create_key(
                "crm-sync-prod", ["passes:read"], tenant_id="acme", expire_time=end
            )
            assert created.key.state == api_key_pb2.KEY_STATE_ACTIVE
            stored = client.get_key(created.key.id, tenant_id="acme")
            assert stored.expire_time.ToDatetime(tzinfo=UTC) == end

    def test_no_expire_time_never_expires(self, server: RunningServer) -> None:
        """A key created without expire_time has none and still verifies years later."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            assert not created.key.HasField("expire_time")
            server.clock.advance(timedelta(days=3650))
            assert client.verify(created.secret, ["passes:read"], tenant_id="acme").code == VALID

    def test_out_of_range_timestamp_is_invalid_argument(self, server: RunningServer) -> None:
        """A Timestamp beyond year 9999 is INVALID_ARGUMENT, not INTERNAL."""
        with server.channel() as channel:
            manager, _ = server.stubs(channel)
            request = key_manager_pb2.CreateKeyRequest(
                tenant_id="acme",
                name="crm-sync-prod",
                scopes=["passes:read"],
                expire_time=Timestamp(seconds=10**12),
            )
            with pytest.raises(grpc.RpcError) as raised:
                manager.CreateKey(request, metadata=(("x-api-key", server.admin_key),))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class TestExpiredVerify:
    def test_cached_key_is_expired_the_moment_it_expires(
        self, cached_server: RunningServer
    ) -> None:
        """A key held in the cache verifies 1 µs before expire_time and is EXPIRED at it."""
        clock = cached_server.clock
        end = clock.now() + timedelta(hours=1)
        with cached_server.client() as client:
            created = client.create_key(
                "crm-sync-prod", ["passes:read"], tenant_id="acme", expire_time=end
            )
            assert client.verify(created.secret, ["passes:read"], tenant_id="acme").code == VALID
            cached = cached_server.app.services.cache.get(digest(created.secret))
            assert isinstance(cached, VerifyRecord)

            clock.set(end - MICROSECOND)
            assert client.verify(created.secret, ["passes:read"], tenant_id="acme").code == VALID
            clock.set(end)
            expired = client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert expired.code == EXPIRED
            assert not expired.valid
            assert expired.http_status == 401
            assert expired.key_id == created.key.id
            assert expired.expire_time.ToDatetime(tzinfo=UTC) == end

    def test_expired_key_without_needed_scope_is_still_expired(self, server: RunningServer) -> None:
        """Expiry is reported before missing scopes."""
        with server.client() as client:
            created = client.create_key(
                "crm-sync-prod",
                ["passes:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(minutes=1),
            )
            server.clock.advance(timedelta(minutes=2))
            answer = client.verify(created.secret, ["passes:write"], tenant_id="acme")
            assert answer.code == EXPIRED
            assert list(answer.missing_scopes) == []

    def test_expired_caller_key_is_unauthenticated(self, server: RunningServer) -> None:
        """A management key past its expire_time can no longer call the API."""
        with server.client() as admin:
            reader = admin.create_key(
                "acme-reader",
                ["apikeys:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(minutes=1),
            )
        with server.client(reader.secret) as client:
            assert [k.id for k in client.list_keys()] == [reader.key.id]
            server.clock.advance(timedelta(minutes=1))
            with pytest.raises(Unauthenticated) as raised:
                list(client.list_keys())
            assert "expired" in raised.value.details


class TestExpiredState:
    def test_get_and_list_show_expired(self, server: RunningServer) -> None:
        """After expire_time, GetKey and ListKeys report state EXPIRED; others stay ACTIVE."""
        with server.client() as client:
            short = client.create_key(
                "short-lived",
                ["passes:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(minutes=5),
            )
            lasting = client.create_key("long-lived", ["passes:read"], tenant_id="acme")
            listed = {k.id: k.state for k in client.list_keys(tenant_id="acme")}
            assert listed[short.key.id] == api_key_pb2.KEY_STATE_ACTIVE

            server.clock.advance(timedelta(minutes=5))
            got = client.get_key(short.key.id, tenant_id="acme")
            assert got.state == api_key_pb2.KEY_STATE_EXPIRED
            listed = {k.id: k.state for k in client.list_keys(tenant_id="acme")}
            assert listed == {
                short.key.id: api_key_pb2.KEY_STATE_EXPIRED,
                lasting.key.id: api_key_pb2.KEY_STATE_ACTIVE,
            }

    def test_revoked_after_expiry_reads_revoked(self, server: RunningServer) -> None:
        """Revoking an expired key is allowed and its state becomes REVOKED."""
        with server.client() as client:
            created = client.create_key(
                "short-lived",
                ["passes:read"],
                tenant_id="acme",
                expire_time=server.clock.now() + timedelta(minutes=5),
            )
            server.clock.advance(timedelta(hours=1))
            revoked = client.revoke_key(created.key.id, tenant_id="acme", reason="cleanup")
            assert revoked.state == api_key_pb2.KEY_STATE_REVOKED
            answer = client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert answer.code == key_verifier_pb2.VERIFY_CODE_REVOKED
