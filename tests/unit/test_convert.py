"""Proto <-> domain conversion: ApiKey without secrets, events, Verify answers, bad times."""

from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from apikeys.v1 import api_key_pb2, key_verifier_pb2
from apikeys_server.domain.errors import InvalidArgument
from apikeys_server.domain.key_format import KeyFormat, digest
from apikeys_server.domain.records import (
    EventAction,
    FieldChange,
    KeyEvent,
    KeyRecord,
    VerifyRecord,
)
from apikeys_server.domain.scopes import Scope
from apikeys_server.domain.verification import (
    MALFORMED,
    MISSING,
    NOT_FOUND,
    VerifyCode,
    VerifyResult,
)
from apikeys_server.rpc import convert

NOW = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
FORMAT = KeyFormat("ak")
SECRET = FORMAT.generate()


def record(**changes: object) -> KeyRecord:
    fields: dict[str, object] = {
        "id": "key_abc",
        "tenant_id": "acme",
        "name": "crm-sync-prod",
        "scopes": frozenset({"passes:write", "customers:read", "passes:read"}),
        "hint": FORMAT.hint(SECRET),
        "digest": digest(SECRET),
        "create_time": NOW - timedelta(days=1),
    }
    fields.update(changes)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def found(**changes: object) -> VerifyRecord:
    """The record the Verify lookup would find for ``record(**changes)``."""
    return VerifyRecord.of(record(**changes))


class TestApiKey:
    def test_fields(self) -> None:
        """Every public field is carried; scopes are sorted; unset optionals stay unset."""
        message = convert.api_key(record(), NOW)
        assert message.id == "key_abc"
        assert message.tenant_id == "acme"
        assert message.name == "crm-sync-prod"
        assert list(message.scopes) == ["customers:read", "passes:read", "passes:write"]
        assert message.hint == FORMAT.hint(SECRET)
        assert message.state == api_key_pb2.KEY_STATE_ACTIVE
        assert message.create_time.ToDatetime(tzinfo=UTC) == NOW - timedelta(days=1)
        for name in ("expire_time", "revoke_time", "last_used_time"):
            assert not message.HasField(name)
        assert message.replaced_by == message.rotated_from == message.revoke_reason == ""

    def test_optional_fields_when_set(self) -> None:
        """Times, rotation links and revoke reason are carried when present."""
        key = record(
            expire_time=NOW + timedelta(days=1),
            revoke_time=NOW - timedelta(hours=1),
            revoke_reason="leaked",
            last_used_time=NOW - timedelta(minutes=1),
            replaced_by="key_new",
            rotated_from="key_old",
        )
        message = convert.api_key(key, NOW)
        assert message.expire_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(days=1)
        assert message.revoke_time.ToDatetime(tzinfo=UTC) == NOW - timedelta(hours=1)
        assert message.last_used_time.ToDatetime(tzinfo=UTC) == NOW - timedelta(minutes=1)
        assert message.revoke_reason == "leaked"
        assert message.replaced_by == "key_new"
        assert message.rotated_from == "key_old"

    @pytest.mark.parametrize(
        ("changes", "state"),
        [
            ({}, api_key_pb2.KEY_STATE_ACTIVE),
            ({"expire_time": NOW}, api_key_pb2.KEY_STATE_EXPIRED),
            ({"expire_time": NOW + timedelta(microseconds=1)}, api_key_pb2.KEY_STATE_ACTIVE),
            ({"revoke_time": NOW}, api_key_pb2.KEY_STATE_REVOKED),
            ({"revoke_time": NOW, "expire_time": NOW}, api_key_pb2.KEY_STATE_REVOKED),
        ],
        ids=["active", "expired", "not-yet-expired", "revoked", "revoked-and-expired"],
    )
    def test_state_at_now(self, changes: dict[str, object], state: int) -> None:
        """The state is derived at the given time; revoked wins over expired."""
        assert convert.api_key(record(**changes), NOW).state == state

    def test_never_contains_secret_or_digest(self) -> None:
        """The serialized ApiKey holds neither the key, its digest, nor the digest in hex."""
        raw = convert.api_key(record(last_used_time=NOW), NOW).SerializeToString()
        assert SECRET.encode() not in raw
        assert SECRET[len("ak_") + 4 :].encode() not in raw
        assert digest(SECRET) not in raw
        assert digest(SECRET).hex().encode() not in raw

    def test_schema_has_no_secret_field(self) -> None:
        """The ApiKey message has no field that could carry a secret or its hash."""
        names = {field.name for field in api_key_pb2.ApiKey.DESCRIPTOR.fields}
        for word in ("secret", "digest", "hash", "key_value", "plaintext"):
            assert not any(word in name for name in names)


class TestKeyEvent:
    def test_fields(self) -> None:
        """An event carries its ids, time, action, actor and changes in order."""
        event = KeyEvent(
            id="evt_1",
            time=NOW,
            tenant_id="acme",
            key_id="key_abc",
            action=EventAction.UPDATED,
            actor_key_id="key_admin",
            changes=(FieldChange("name", "old", "new"), FieldChange("scopes", "a", "a,b")),
        )
        message = convert.key_event(event)
        assert message.id == "evt_1"
        assert message.time.ToDatetime(tzinfo=UTC) == NOW
        assert (message.tenant_id, message.key_id, message.actor_key_id) == (
            "acme",
            "key_abc",
            "key_admin",
        )
        assert message.action == api_key_pb2.EVENT_ACTION_UPDATED
        assert [(c.field, c.old_value, c.new_value) for c in message.changes] == [
            ("name", "old", "new"),
            ("scopes", "a", "a,b"),
        ]

    @pytest.mark.parametrize("action", list(EventAction))
    def test_every_action_maps(self, action: EventAction) -> None:
        """Each domain action has a proto value other than UNSPECIFIED."""
        event = KeyEvent("evt_1", NOW, "acme", "key_abc", action, "", ())
        message = convert.key_event(event)
        assert message.action != api_key_pb2.EVENT_ACTION_UNSPECIFIED
        assert api_key_pb2.EventAction.Name(message.action) == f"EVENT_ACTION_{action.name}"


class TestScope:
    def test_scope(self) -> None:
        """A catalog entry becomes a Scope message with name and description."""
        message = convert.scope(Scope("passes:read", "Read passes."))
        assert (message.name, message.description) == ("passes:read", "Read passes.")


POSITION = 42


class TestVerifyResponse:
    @pytest.mark.parametrize(
        ("result", "code"),
        [
            (MISSING, key_verifier_pb2.VERIFY_CODE_MISSING),
            (MALFORMED, key_verifier_pb2.VERIFY_CODE_MALFORMED),
            (NOT_FOUND, key_verifier_pb2.VERIFY_CODE_NOT_FOUND),
        ],
    )
    def test_keyless_answers(self, result: VerifyResult, code: int) -> None:
        """MISSING, MALFORMED and NOT_FOUND answer 401 and carry no key details."""
        message = convert.verify_response(result, POSITION)
        assert not message.valid
        assert message.code == code
        assert message.http_status == 401
        assert message.key_id == message.tenant_id == message.name == ""
        assert list(message.scopes) == []
        assert not message.HasField("expire_time")

    @pytest.mark.parametrize(("result", "position"), [(MISSING, 0), (MALFORMED, 0), (NOT_FOUND, 7)])
    def test_keyless_feed_position(self, result: VerifyResult, position: int) -> None:
        """NOT_FOUND reflects the feed position; MISSING and MALFORMED depend on no state: 0."""
        assert convert.verify_response(result, 7).feed_position == position
        assert convert.verify_response(result, 8).feed_position == (position and 8)

    def test_valid_answer_follows_the_feed_position(self) -> None:
        """A reused VALID answer is rebuilt when the feed position moves."""
        key = found()
        first = convert.verify_response(VerifyResult(VerifyCode.VALID, key), 7)
        assert convert.verify_response(VerifyResult(VerifyCode.VALID, key), 7) is first
        later = convert.verify_response(VerifyResult(VerifyCode.VALID, key), 9)
        assert (first.feed_position, later.feed_position) == (7, 9)

    def test_valid_answer(self) -> None:
        """VALID answers 200 with the key's id, tenant, name, sorted scopes and expiry."""
        key = found(expire_time=NOW + timedelta(days=1))
        message = convert.verify_response(VerifyResult(VerifyCode.VALID, key), POSITION)
        assert message.valid
        assert message.code == key_verifier_pb2.VERIFY_CODE_VALID
        assert message.http_status == 200
        assert (message.key_id, message.tenant_id, message.name) == (
            "key_abc",
            "acme",
            "crm-sync-prod",
        )
        assert list(message.scopes) == ["customers:read", "passes:read", "passes:write"]
        assert message.expire_time.ToDatetime(tzinfo=UTC) == NOW + timedelta(days=1)
        assert list(message.missing_scopes) == []

    def test_insufficient_scope_answer(self) -> None:
        """INSUFFICIENT_SCOPE answers 403 listing the missing scopes."""
        result = VerifyResult(VerifyCode.INSUFFICIENT_SCOPE, found(), ("a:b", "c:d"))
        message = convert.verify_response(result, POSITION)
        assert not message.valid
        assert message.code == key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
        assert message.http_status == 403
        assert list(message.missing_scopes) == ["a:b", "c:d"]

    @pytest.mark.parametrize(
        ("code", "proto_code"),
        [
            (VerifyCode.REVOKED, key_verifier_pb2.VERIFY_CODE_REVOKED),
            (VerifyCode.EXPIRED, key_verifier_pb2.VERIFY_CODE_EXPIRED),
        ],
    )
    def test_revoked_and_expired_answers(self, code: VerifyCode, proto_code: int) -> None:
        """REVOKED and EXPIRED answer 401 with the key identified."""
        message = convert.verify_response(VerifyResult(code, found()), POSITION)
        assert not message.valid
        assert message.code == proto_code
        assert message.http_status == 401
        assert message.key_id == "key_abc"

    def test_never_contains_secret_or_digest(self) -> None:
        """A Verify answer never carries the key or its digest."""
        result = VerifyResult(VerifyCode.VALID, found())
        raw = convert.verify_response(result, POSITION).SerializeToString()
        assert SECRET.encode() not in raw
        assert digest(SECRET) not in raw

    def test_every_code_maps(self) -> None:
        """Each domain VerifyCode has its proto code of the same name."""
        for code in VerifyCode:
            message = convert.verify_response(VerifyResult(code, found()), POSITION)
            assert key_verifier_pb2.VerifyCode.Name(message.code) == f"VERIFY_CODE_{code.name}"


class TestTimestamp:
    def test_round_trip(self) -> None:
        """A datetime survives timestamp() and back at microsecond precision."""
        assert convert.timestamp(NOW).ToDatetime(tzinfo=UTC) == NOW

    def test_absent_is_none(self) -> None:
        """An unset request Timestamp means None (e.g. never expires)."""
        assert convert.optional_datetime(Timestamp(seconds=123), "expire_time", False) is None

    def test_present_is_aware_utc(self) -> None:
        """A set Timestamp becomes a timezone-aware UTC datetime."""
        value = convert.optional_datetime(Timestamp(seconds=1_700_000_000), "expire_time", True)
        assert value == datetime.fromtimestamp(1_700_000_000, UTC)
        assert value is not None and value.tzinfo is not None

    def test_epoch_zero_when_present(self) -> None:
        """A present all-zero Timestamp is the epoch, not 'absent'."""
        value = convert.optional_datetime(Timestamp(), "expire_time", True)
        assert value == datetime(1970, 1, 1, tzinfo=UTC)

    @pytest.mark.parametrize(
        "message",
        [
            Timestamp(seconds=253402300800),
            Timestamp(seconds=-62135596801),
            Timestamp(seconds=2**62),
            Timestamp(seconds=-(2**62)),
            Timestamp(seconds=0, nanos=-1),
            Timestamp(seconds=0, nanos=2_000_000_000),
        ],
        ids=["after-9999", "before-0001", "huge", "huge-negative", "negative-nanos", "big-nanos"],
    )
    def test_out_of_range_is_invalid_argument(self, message: Timestamp) -> None:
        """An out-of-range Timestamp is INVALID_ARGUMENT naming the field."""
        with pytest.raises(InvalidArgument, match="expire_time is not a valid timestamp"):
            convert.optional_datetime(message, "expire_time", True)


class TestDuration:
    @pytest.mark.parametrize(
        ("message", "value"),
        [
            (Duration(), timedelta(0)),
            (Duration(seconds=3600), timedelta(hours=1)),
            (Duration(seconds=1, nanos=500_000_000), timedelta(seconds=1.5)),
            (Duration(seconds=-1, nanos=-500_000_000), timedelta(seconds=-1.5)),
            (Duration(nanos=-1000), timedelta(microseconds=-1)),
        ],
    )
    def test_valid(self, message: Duration, value: timedelta) -> None:
        """Valid durations become the matching timedelta."""
        assert convert.duration(message, "overlap") == value

    @pytest.mark.parametrize(
        "message",
        [Duration(seconds=1, nanos=-1), Duration(seconds=-1, nanos=1)],
        ids=["positive-seconds-negative-nanos", "negative-seconds-positive-nanos"],
    )
    def test_mixed_signs_are_invalid_argument(self, message: Duration) -> None:
        """Seconds and nanos of different signs are INVALID_ARGUMENT naming the field."""
        with pytest.raises(InvalidArgument, match="overlap is not a valid duration"):
            convert.duration(message, "overlap")

    @pytest.mark.parametrize("seconds", [10**15, -(10**15), 2**62])
    def test_overflow_is_invalid_argument(self, seconds: int) -> None:
        """A duration too large for a timedelta is INVALID_ARGUMENT, not an internal error."""
        with pytest.raises(InvalidArgument, match="overlap is not a valid duration"):
            convert.duration(Duration(seconds=seconds), "overlap")
