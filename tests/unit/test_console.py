"""The admin console's parts that need no browser: sessions, CSRF, what pages show, errors."""

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from apikeys.v1 import api_key_pb2
from apikeys_client import (
    AlreadyGone,
    ApiKeysClient,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from apikeys_server.console import csrf, views
from apikeys_server.console.app import end_of_day, field_errors, refused
from apikeys_server.console.session import SessionStore

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


class TestSessions:
    def test_idle_sessions_expire_and_say_so(self) -> None:
        """A session unused for longer than the idle time is gone, and get() says it expired."""
        clock = Clock()
        store = SessionStore(idle_seconds=60, clock=clock)
        session = store.new()
        clock.now += 59
        assert store.get(session.id) == (session, False)
        clock.now += 61
        assert store.get(session.id) == (None, True)
        assert store.get("never-issued") == (None, False)

    def test_use_restarts_the_idle_clock(self) -> None:
        clock = Clock()
        store = SessionStore(idle_seconds=60, clock=clock)
        session = store.new()
        for _ in range(5):
            clock.now += 50
            assert store.get(session.id)[0] is session

    def test_sign_in_issues_a_new_id_and_token(self) -> None:
        """No session fixation: the anonymous id and its CSRF token die at sign-in."""
        store = SessionStore(idle_seconds=60)
        anonymous = store.new()
        client = ApiKeysClient("127.0.0.1:1", "ak_unused")
        signed = store.sign_in(anonymous, client, is_platform=False, tenant="acme")
        assert signed.id != anonymous.id and signed.csrf_token != anonymous.csrf_token
        assert store.get(anonymous.id)[0] is None
        assert store.get(signed.id)[0] is signed and signed.signed_in
        store.drop(signed)
        assert signed.client is None and store.get(signed.id)[0] is None

    def test_ids_are_random_and_long(self) -> None:
        store = SessionStore(idle_seconds=60)
        ids = {store.new().id for _ in range(100)}
        assert len(ids) == 100 and all(len(i) >= 40 for i in ids)

    def test_repr_shows_no_key(self) -> None:
        """The client (holding the operator's key) is left out of the session's repr."""
        store = SessionStore(idle_seconds=60)
        client = ApiKeysClient("127.0.0.1:1", "ak_secretsecret")
        session = store.sign_in(store.new(), client, is_platform=True, tenant="")
        assert "ak_secretsecret" not in repr(session) and "client" not in repr(session)
        store.close()


class TestCsrf:
    def test_only_the_sessions_token_passes(self) -> None:
        assert csrf.valid("abc", "abc")
        assert not csrf.valid("abc", "abd")
        assert not csrf.valid("abc", None)
        assert not csrf.valid("", "")


class TestViews:
    def test_relative_times(self) -> None:
        assert views.relative(NOW - timedelta(minutes=3, seconds=10), NOW) == "3 min ago"
        assert views.relative(NOW + timedelta(hours=2, minutes=5), NOW) == "in 2 h"
        assert views.relative(NOW - timedelta(days=9), NOW) == "9 d ago"
        assert views.relative(NOW - timedelta(seconds=5), NOW) == "just now"
        assert views.relative(None, NOW) == ""

    def test_states(self) -> None:
        """active, expiring (within 7 days), rotated (with successor), expired, revoked."""
        active = api_key_pb2.ApiKey(state=api_key_pb2.KEY_STATE_ACTIVE)
        assert views.key_row(active, NOW).state == "active"
        soon = api_key_pb2.ApiKey(
            state=api_key_pb2.KEY_STATE_ACTIVE, expire_time=stamp(NOW + timedelta(days=2))
        )
        assert views.key_row(soon, NOW).state == "expiring"
        rotated = api_key_pb2.ApiKey(
            state=api_key_pb2.KEY_STATE_ACTIVE,
            replaced_by="key_new",
            expire_time=stamp(NOW + timedelta(hours=1)),
        )
        row = views.key_row(rotated, NOW)
        assert row.state == "rotated" and "key_new" in row.state_detail
        assert "in 1 h" in row.state_detail
        revoked = api_key_pb2.ApiKey(
            state=api_key_pb2.KEY_STATE_REVOKED, revoke_reason="leaked", revoke_time=stamp(NOW)
        )
        assert views.key_row(revoked, NOW).state_detail == "revoked just now: leaked"
        expired = api_key_pb2.ApiKey(state=api_key_pb2.KEY_STATE_EXPIRED)
        assert views.key_row(expired, NOW).state == "expired"

    def test_last_used_shows_ago_with_the_exact_time(self) -> None:
        key = api_key_pb2.ApiKey(last_used_time=stamp(NOW - timedelta(minutes=3)))
        row = views.key_row(key, NOW)
        assert row.last_used == views.Time("3 min ago", "2026-05-01 11:57:00 UTC")
        assert views.key_row(api_key_pb2.ApiKey(), NOW).last_used.text == "never"

    def test_the_tripwire_flag(self) -> None:
        """A key presented after it stopped working carries the flag; others do not."""
        plain = api_key_pb2.ApiKey()
        assert views.key_row(plain, NOW).presented_after is None
        tripped = api_key_pb2.ApiKey(
            presented_after_revocation_count=2,
            presented_after_revocation_time=stamp(NOW - timedelta(hours=1)),
        )
        assert views.key_row(tripped, NOW).presented_after == views.Time(
            "1 h ago", "2026-05-01 11:00:00 UTC"
        )

    def test_scopes_grouped_by_resource_in_catalog_order(self) -> None:
        catalog = [
            api_key_pb2.Scope(name="passes:read", description="Read passes."),
            api_key_pb2.Scope(name="customers:read", description="Read customers."),
            api_key_pb2.Scope(name="passes:write", description="Write passes."),
        ]
        groups = views.scope_groups(catalog)
        assert [resource for resource, _ in groups] == ["passes", "customers"]
        assert [choice.action for choice in groups[0][1]] == ["read", "write"]


class TestErrors:
    def test_field_violations_go_next_to_their_field(self) -> None:
        """scopes[1] -> the scopes fieldset; name -> the name input; the rest on the form."""
        error = InvalidArgument(
            grpc.StatusCode.INVALID_ARGUMENT,
            "scope 'x' is not in the catalog",
            reason="SCOPE_NOT_IN_CATALOG",
            field_violations=[("scopes[1]", "scope 'x' is not in the catalog; see ListScopes")],
        )
        assert field_errors(error) == {"scopes": "scope 'x' is not in the catalog; see ListScopes"}
        bare = InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "bad page token")
        assert field_errors(bare) == {"form": "bad page token"}

    @pytest.mark.parametrize("kind", [Unavailable, AlreadyGone, Unauthenticated])
    def test_what_every_page_answers_is_raised_again(self, kind: type[Exception]) -> None:
        """The service down and the operator's key dead go to page(), not next to a field."""
        with pytest.raises(kind):
            refused(kind(grpc.StatusCode.UNAVAILABLE, "down"))

    def test_other_refusals_are_the_forms_to_show(self) -> None:
        refused(PermissionDenied(grpc.StatusCode.PERMISSION_DENIED, "lacks apikeys:manage"))

    def test_expiry_is_the_end_of_the_picked_day(self) -> None:
        assert end_of_day("2026-05-01") == datetime(2026, 5, 2, tzinfo=UTC)
        assert end_of_day("") is None
