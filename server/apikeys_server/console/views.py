"""What the templates show of the service's messages: times, states, scope groups, events."""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from apikeys.v1 import api_key_pb2

EXPIRING_SOON = timedelta(days=7)


def moment(stamp: Timestamp) -> datetime | None:
    """The time of a Timestamp field; None when unset."""
    if not stamp.seconds and not stamp.nanos:
        return None
    return stamp.ToDatetime(tzinfo=UTC)


def exact(value: datetime | None) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


def relative(value: datetime | None, now: datetime) -> str:
    """``3 min ago``, ``in 2 h``, ``just now``; "" when unset."""
    if value is None:
        return ""
    delta = value - now
    seconds = abs(delta.total_seconds())
    if seconds < 60:
        return "just now"
    for size, unit in ((86_400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    return f"in {amount}" if delta.total_seconds() > 0 else f"{amount} ago"


@dataclass(frozen=True)
class Time:
    """A time as shown: how long ago (the text), exactly (the title on hover)."""

    text: str
    exact: str


def shown_time(stamp: Timestamp, now: datetime, missing: str = "—") -> Time:
    value = moment(stamp)
    if value is None:
        return Time(missing, "")
    return Time(relative(value, now), exact(value))


@dataclass(frozen=True)
class KeyRow:
    key: api_key_pb2.ApiKey
    state: str  # active, expiring, expired, revoked, rotated
    state_detail: str
    created: Time
    expires: Time
    last_used: Time
    presented_after: Time | None  # the tripwire, when the key was presented after it stopped


def key_row(key: api_key_pb2.ApiKey, now: datetime) -> KeyRow:
    expire = moment(key.expire_time)
    if key.state == api_key_pb2.KEY_STATE_REVOKED:
        state = "revoked"
        detail = f"revoked {relative(moment(key.revoke_time), now)}"
        if key.revoke_reason:
            detail += f": {key.revoke_reason}"
    elif key.state == api_key_pb2.KEY_STATE_EXPIRED:
        state, detail = "expired", f"expired {relative(expire, now)}"
    elif key.replaced_by:
        state = "rotated"
        until = f", works until {exact(expire)} ({relative(expire, now)})" if expire else ""
        detail = f"replaced by {key.replaced_by}{until}"
    elif expire is not None and expire - now <= EXPIRING_SOON:
        state, detail = "expiring", f"expires {relative(expire, now)}"
    else:
        state, detail = "active", ""
    presented = None
    if key.presented_after_revocation_count:
        presented = shown_time(key.presented_after_revocation_time, now)
    return KeyRow(
        key,
        state,
        detail,
        shown_time(key.create_time, now),
        shown_time(key.expire_time, now, missing="never"),
        shown_time(key.last_used_time, now, missing="never"),
        presented,
    )


@dataclass(frozen=True)
class ScopeChoice:
    name: str
    action: str  # the part after the resource: "read" of "passes:read"
    description: str


def scope_groups(scopes: Iterable[api_key_pb2.Scope]) -> list[tuple[str, list[ScopeChoice]]]:
    """The catalog grouped by resource (``passes`` of ``passes:read``), in catalog order."""
    groups: dict[str, list[ScopeChoice]] = {}
    for scope in scopes:
        resource, _, action = scope.name.partition(":")
        groups.setdefault(resource, []).append(
            ScopeChoice(scope.name, action or scope.name, scope.description)
        )
    return list(groups.items())


ACTIONS = {
    api_key_pb2.EVENT_ACTION_CREATED: "created",
    api_key_pb2.EVENT_ACTION_UPDATED: "edited",
    api_key_pb2.EVENT_ACTION_ROTATED: "rotated",
    api_key_pb2.EVENT_ACTION_REVOKED: "revoked",
    api_key_pb2.EVENT_ACTION_LEAKED: "reported leaked",
    api_key_pb2.EVENT_ACTION_PRESENTED_AFTER_REVOCATION: "presented after revocation",
}


@dataclass(frozen=True)
class EventRow:
    event: api_key_pb2.KeyEvent
    action: str
    time: Time


def event_row(event: api_key_pb2.KeyEvent, now: datetime) -> EventRow:
    return EventRow(event, ACTIONS.get(event.action, "changed"), shown_time(event.time, now))


OVERLAPS = (
    ("0", "none: the old key stops now", timedelta(0)),
    ("3600", "1 hour", timedelta(hours=1)),
    ("86400", "24 hours", timedelta(hours=24)),
    ("604800", "7 days", timedelta(days=7)),
)
