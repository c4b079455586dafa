"""Proto <-> domain conversion. Never puts a secret or digest into an ApiKey."""

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2
from apikeys_server.domain.errors import InvalidArgument
from apikeys_server.domain.manager import LeakOutcome, LeakResult
from apikeys_server.domain.ports import FeedUpdate
from apikeys_server.domain.records import EventAction, KeyEvent, KeyRecord, KeyState, VerifyRecord
from apikeys_server.domain.scopes import Scope
from apikeys_server.domain.verification import VerifyCode, VerifyResult

_STATE = {
    KeyState.ACTIVE: api_key_pb2.KEY_STATE_ACTIVE,
    KeyState.EXPIRED: api_key_pb2.KEY_STATE_EXPIRED,
    KeyState.REVOKED: api_key_pb2.KEY_STATE_REVOKED,
}
_ACTION = {
    EventAction.CREATED: api_key_pb2.EVENT_ACTION_CREATED,
    EventAction.UPDATED: api_key_pb2.EVENT_ACTION_UPDATED,
    EventAction.ROTATED: api_key_pb2.EVENT_ACTION_ROTATED,
    EventAction.REVOKED: api_key_pb2.EVENT_ACTION_REVOKED,
    EventAction.LEAKED: api_key_pb2.EVENT_ACTION_LEAKED,
    EventAction.PRESENTED_AFTER_REVOCATION: api_key_pb2.EVENT_ACTION_PRESENTED_AFTER_REVOCATION,
}
_CODE = {
    VerifyCode.VALID: key_verifier_pb2.VERIFY_CODE_VALID,
    VerifyCode.MISSING: key_verifier_pb2.VERIFY_CODE_MISSING,
    VerifyCode.MALFORMED: key_verifier_pb2.VERIFY_CODE_MALFORMED,
    VerifyCode.NOT_FOUND: key_verifier_pb2.VERIFY_CODE_NOT_FOUND,
    VerifyCode.REVOKED: key_verifier_pb2.VERIFY_CODE_REVOKED,
    VerifyCode.EXPIRED: key_verifier_pb2.VERIFY_CODE_EXPIRED,
    VerifyCode.INSUFFICIENT_SCOPE: key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE,
}


def timestamp(value: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(value)
    return message


def optional_datetime(message: Timestamp, field: str, present: bool) -> datetime | None:
    """A Timestamp field from a request: None when unset, INVALID_ARGUMENT when out of range."""
    if not present:
        return None
    try:
        return message.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(
            f"{field} is not a valid timestamp", reason="INVALID_TIMESTAMP", field=field
        ) from None


def duration(message: Duration, field: str) -> timedelta:
    if message.nanos and (
        message.seconds > 0 > message.nanos or message.seconds < 0 < message.nanos
    ):
        raise InvalidArgument(
            f"{field} is not a valid duration (seconds and nanos differ in sign)",
            reason="INVALID_DURATION",
            field=field,
        )
    try:
        return message.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidArgument(
            f"{field} is not a valid duration", reason="INVALID_DURATION", field=field
        ) from None


def api_key(key: KeyRecord, now: datetime) -> api_key_pb2.ApiKey:
    message = api_key_pb2.ApiKey(
        id=key.id,
        tenant_id=key.tenant_id,
        name=key.name,
        scopes=sorted(key.scopes),
        hint=key.hint,
        state=_STATE[key.state(now)],
        create_time=timestamp(key.create_time),
        replaced_by=key.replaced_by or "",
        rotated_from=key.rotated_from or "",
        revoke_reason=key.revoke_reason,
        leak_source=key.leak_source,
        leak_url=key.leak_url,
        presented_after_revocation_count=key.presented_after_revocation_count,
    )
    if key.expire_time is not None:
        message.expire_time.CopyFrom(timestamp(key.expire_time))
    if key.revoke_time is not None:
        message.revoke_time.CopyFrom(timestamp(key.revoke_time))
    if key.last_used_time is not None:
        message.last_used_time.CopyFrom(timestamp(key.last_used_time))
    if key.leak_time is not None:
        message.leak_time.CopyFrom(timestamp(key.leak_time))
    if key.presented_after_revocation_time is not None:
        message.presented_after_revocation_time.CopyFrom(
            timestamp(key.presented_after_revocation_time)
        )
    return message


def key_event(event: KeyEvent) -> api_key_pb2.KeyEvent:
    return api_key_pb2.KeyEvent(
        id=event.id,
        time=timestamp(event.time),
        tenant_id=event.tenant_id,
        key_id=event.key_id,
        action=_ACTION[event.action],
        actor_key_id=event.actor_key_id,
        changes=[
            api_key_pb2.FieldChange(field=c.field, old_value=c.old_value, new_value=c.new_value)
            for c in event.changes
        ],
    )


def scope(item: Scope) -> api_key_pb2.Scope:
    return api_key_pb2.Scope(name=item.name, description=item.description)


def verify_response(result: VerifyResult, position: int) -> key_verifier_pb2.VerifyResponse:
    """The answer to Verify, reflecting the feed up to ``position``.

    Answers are shared read-only messages where they can be: rebuilt only when the record or
    the feed position changed.
    """
    key = result.key
    if key is None:
        if result.code is VerifyCode.NOT_FOUND:
            return _not_found(position)
        return _STATELESS[result.code]
    if result.code is not VerifyCode.VALID or result.missing_scopes:
        return _keyed_response(result, key, position)
    known = _VALID_ANSWERS.get(key.digest)
    if known is not None and known[0] is key and known[1] == position:
        return known[2]
    response = _keyed_response(result, key, position)
    if len(_VALID_ANSWERS) >= _VALID_ANSWERS_MAX:
        _VALID_ANSWERS.clear()
    _VALID_ANSWERS[key.digest] = (key, position, response)
    return response


def _keyed_response(
    result: VerifyResult, key: VerifyRecord, position: int
) -> key_verifier_pb2.VerifyResponse:
    response = key_verifier_pb2.VerifyResponse(
        valid=result.valid,
        code=_CODE[result.code],
        http_status=result.code.http_status,
        key_id=key.id,
        tenant_id=key.tenant_id,
        name=key.name,
        scopes=sorted(key.scopes),
        missing_scopes=result.missing_scopes,
        feed_position=position,
    )
    if key.expire_time is not None:
        response.expire_time.CopyFrom(timestamp(key.expire_time))
    return response


def _not_found(position: int) -> key_verifier_pb2.VerifyResponse:
    global _not_found_answer
    known_position, known = _not_found_answer
    if known_position == position:
        return known
    response = key_verifier_pb2.VerifyResponse(
        valid=False,
        code=_CODE[VerifyCode.NOT_FOUND],
        http_status=VerifyCode.NOT_FOUND.http_status,
        feed_position=position,
    )
    _not_found_answer = (position, response)
    return response


# The VALID answer of each recently verified key, built once per record and feed position: a
# cache hit then builds no message. Keyed by digest and checked by identity, so a changed key
# (a new record, evicted from the cache) never gets an old answer. Bounded: starts over when
# full.
_VALID_ANSWERS: dict[bytes, tuple[VerifyRecord, int, key_verifier_pb2.VerifyResponse]] = {}
_VALID_ANSWERS_MAX = 2048  # each answer message holds ~1.6 KB

# The NOT_FOUND answer at the latest position, replaced whole (one tuple: threads read it).
_not_found_answer: tuple[int, key_verifier_pb2.VerifyResponse] = (
    -1,
    key_verifier_pb2.VerifyResponse(),
)

# Answers decided without any stored state are constant: built once, shared read-only.
_STATELESS = {
    code: key_verifier_pb2.VerifyResponse(
        valid=False, code=_CODE[code], http_status=code.http_status
    )
    for code in (VerifyCode.MISSING, VerifyCode.MALFORMED)
}


def feed_update(update: FeedUpdate) -> key_verifier_pb2.WatchKeyChangesResponse:
    return key_verifier_pb2.WatchKeyChangesResponse(
        changes=[
            key_verifier_pb2.KeyChange(
                position=change.position,
                key_id=change.key_id,
                tenant_id=change.tenant_id,
                kind=_ACTION[change.kind],
                time=timestamp(change.time),
            )
            for change in update.changes
        ],
        position=update.position,
        confirm_time=timestamp(update.confirm_time),
    )


_LEAK_OUTCOME = {
    LeakOutcome.REVOKED: key_manager_pb2.LEAK_OUTCOME_REVOKED,
    LeakOutcome.ALREADY_REVOKED: key_manager_pb2.LEAK_OUTCOME_ALREADY_REVOKED,
    LeakOutcome.NOT_FOUND: key_manager_pb2.LEAK_OUTCOME_NOT_FOUND,
    LeakOutcome.MALFORMED: key_manager_pb2.LEAK_OUTCOME_MALFORMED,
}


def leak_result(result: LeakResult) -> key_manager_pb2.LeakedKeyResult:
    return key_manager_pb2.LeakedKeyResult(
        hint=result.hint, outcome=_LEAK_OUTCOME[result.outcome], key_id=result.key_id
    )
