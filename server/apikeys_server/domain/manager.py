"""Key management: create, read, list, update, rotate, revoke, and the audit trail.

Each write runs in one transaction with its audit event and its change-feed entry. The store
evicts the key from this process's cache once it commits, before the call returns, so the next
Verify served here sees the change; other processes learn of it from the feed.
"""

import base64
import enum
import hashlib
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from apikeys_server.domain import pagination
from apikeys_server.domain import scopes as reserved
from apikeys_server.domain.access import Caller
from apikeys_server.domain.clock import Clock
from apikeys_server.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from apikeys_server.domain.key_format import KeyFormat, digest
from apikeys_server.domain.ports import KeyQuery, KeyStore, KeyWriter
from apikeys_server.domain.records import (
    EventAction,
    FieldChange,
    KeyEvent,
    KeyRecord,
    KeyState,
    RequestRecord,
)
from apikeys_server.domain.scopes import Scope, ScopeCatalog
from apikeys_server.domain.validation import (
    NAME_PATTERN,
    shown,
    validate_key_id,
    validate_name,
    validate_reason,
    validate_request_id,
    validate_tenant,
)

UPDATABLE_FIELDS = ("name", "scopes")
# How long a request_id is remembered (AIP-155): a retry within this never makes a second key.
REQUEST_ID_TTL = timedelta(hours=24)
# Expired request ids each create or rotate deletes (in its own transaction, skipping any
# another is deleting): more than one per call, so the table holds about a day of ids.
REQUEST_PRUNE_BATCH = 100
# RevokeLeakedKeys: secrets one call may report, and the lengths of what it records.
MAX_LEAKED_SECRETS = 1000
MAX_LEAK_SOURCE_LENGTH = 64
MAX_LEAK_URL_LENGTH = 2048
LEAKED_REASON = "leaked"
T = TypeVar("T")


class LeakOutcome(enum.Enum):
    REVOKED = "revoked"
    ALREADY_REVOKED = "already_revoked"
    NOT_FOUND = "not_found"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class LeakResult:
    """What became of one reported secret; ``hint`` is empty for a malformed one."""

    hint: str
    outcome: LeakOutcome
    key_id: str = ""


def new_id(kind: str) -> str:
    return kind + "_" + base64.b32encode(secrets.token_bytes(15)).decode().lower()


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key with its plaintext secret: only ever returned by create and rotate."""

    key: KeyRecord
    secret: str


@dataclass(frozen=True, slots=True)
class Rotation:
    issued: IssuedKey
    previous: KeyRecord


def _fingerprint(*parts: str) -> str:
    """What a request asked for, for telling a retry from another request with the same id."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _show_time(value: datetime | None) -> str:
    return value.isoformat() if value is not None else ""


def _show_scopes(value: Iterable[str]) -> str:
    return " ".join(sorted(value))


class KeyManager:
    def __init__(
        self,
        store: KeyStore,
        catalog: ScopeCatalog,
        key_format: KeyFormat,
        clock: Clock,
        max_overlap: timedelta,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._format = key_format
        self._clock = clock
        self._max_overlap = max_overlap

    # -- create ------------------------------------------------------------------------------

    def create(
        self,
        caller: Caller,
        tenant_id: str,
        name: str,
        scopes: Iterable[str],
        expire_time: datetime | None,
        request_id: str = "",
    ) -> IssuedKey:
        """``request_id`` (optional, AIP-155): a retry with the same one never makes a second
        key; it raises AlreadyExists naming the key made (see ``_claim``)."""
        caller.require(reserved.MANAGE)
        tenant = caller.resolve_tenant(tenant_id)
        return self.create_unchecked(
            tenant,
            name,
            scopes,
            expire_time,
            actor_key_id=caller.key_id,
            request_id=request_id,
            request_scope=caller.tenant_id,
        )

    def create_unchecked(
        self,
        tenant_id: str,
        name: str,
        scopes: Iterable[str],
        expire_time: datetime | None,
        actor_key_id: str = "",
        request_id: str = "",
        request_scope: str = "",
    ) -> IssuedKey:
        """Create without a caller: for the operator's `admin-key` command only."""
        tenant = validate_tenant(tenant_id)
        validate_name(name)
        granted = self._catalog.validate_grant(scopes)
        request = validate_request_id(request_id)
        now = self._clock.now()
        issued = self._issue(tenant, name, granted, expire_time, now)
        with self._store.transaction() as tx:
            if request is not None:
                asked = _fingerprint(
                    "create", tenant, name, _show_scopes(granted), _show_time(expire_time)
                )
                claim = RequestRecord(request_scope, request, asked, issued.key.id, now)
                self._claim(tx, claim, "created key")
            # After the claim: a retry answers "already created" even once this has passed.
            if expire_time is not None and expire_time <= now:
                raise InvalidArgument(
                    "expire_time must be in the future",
                    reason="EXPIRE_TIME_IN_PAST",
                    field="expire_time",
                )
            tx.insert_key(issued.key)
            self._record(
                tx, issued.key, EventAction.CREATED, actor_key_id, now, self._created(issued.key)
            )
        return issued

    # -- read --------------------------------------------------------------------------------

    def get(self, caller: Caller, tenant_id: str, key_id: str) -> KeyRecord:
        caller.require(reserved.READ)
        tenant = caller.resolve_tenant(tenant_id)
        validate_key_id(key_id)
        key = self._store.get_key(tenant, key_id)
        if key is None:
            raise _not_found(key_id, tenant)
        return key

    def list_keys(
        self,
        caller: Caller,
        tenant_id: str,
        page_size: int,
        page_token: str,
        include_revoked: bool,
        name_prefix: str,
    ) -> Page[KeyRecord]:
        caller.require(reserved.READ)
        tenant = caller.resolve_tenant(tenant_id)
        if name_prefix and not NAME_PATTERN.fullmatch(name_prefix):
            raise InvalidArgument(
                f"name_prefix {shown(name_prefix)} cannot match any key name",
                reason="INVALID_NAME_PREFIX",
                field="name_prefix",
            )
        limit = pagination.page_size(page_size)
        query = KeyQuery(tenant, include_revoked, name_prefix)
        fingerprint = f"keys|{tenant}|{int(include_revoked)}|{name_prefix}"
        after = pagination.decode(page_token, fingerprint)
        keys = self._store.list_keys(query, after, limit + 1)
        return self._page(
            keys, limit, fingerprint, lambda k: pagination.Cursor(k.create_time, k.id)
        )

    def list_events(
        self, caller: Caller, tenant_id: str, key_id: str, page_size: int, page_token: str
    ) -> Page[KeyEvent]:
        caller.require(reserved.READ)
        tenant = caller.resolve_tenant(tenant_id)
        if key_id:
            validate_key_id(key_id)
        limit = pagination.page_size(page_size)
        fingerprint = f"events|{tenant}|{key_id}"
        after = pagination.decode(page_token, fingerprint)
        events = self._store.list_events(tenant, key_id or None, after, limit + 1)
        return self._page(events, limit, fingerprint, lambda e: pagination.Cursor(e.time, e.id))

    def list_scopes(self, caller: Caller) -> list[Scope]:
        caller.require(reserved.READ)
        return self._catalog.list()

    # -- change ------------------------------------------------------------------------------

    def update(
        self,
        caller: Caller,
        tenant_id: str,
        key_id: str,
        name: str,
        scopes: Sequence[str],
        paths: Sequence[str],
    ) -> KeyRecord:
        caller.require(reserved.MANAGE)
        tenant = caller.resolve_tenant(tenant_id)
        validate_key_id(key_id)
        if not paths:
            raise InvalidArgument(
                "update_mask is required; its paths may be: name, scopes",
                reason="UPDATE_MASK_REQUIRED",
                field="update_mask",
            )
        for index, path in enumerate(paths):
            if path not in UPDATABLE_FIELDS:
                raise InvalidArgument(
                    f"update_mask path {shown(path)} cannot be updated; use: name, scopes",
                    reason="UPDATE_MASK_PATH_NOT_UPDATABLE",
                    field=f"update_mask.paths[{index}]",
                )
        new_name = validate_name(name) if "name" in paths else None
        new_scopes = self._catalog.validate_grant(scopes) if "scopes" in paths else None
        now = self._clock.now()
        with self._store.transaction() as tx:
            key = self._active_for_change(tx, tenant, key_id, "update", now, allow_expired=True)
            updated = replace(
                key,
                name=new_name if new_name is not None else key.name,
                scopes=new_scopes if new_scopes is not None else key.scopes,
            )
            changes = self._diff(key, updated)
            if not changes:
                return key
            tx.update_key(updated)
            self._record(tx, key, EventAction.UPDATED, caller.key_id, now, changes)
        return updated

    def rotate(
        self,
        caller: Caller,
        tenant_id: str,
        key_id: str,
        overlap: timedelta,
        request_id: str = "",
    ) -> Rotation:
        """``request_id``: as for ``create``; a retry names the successor already made."""
        caller.require(reserved.MANAGE)
        tenant = caller.resolve_tenant(tenant_id)
        validate_key_id(key_id)
        if overlap < timedelta(0):
            raise InvalidArgument(
                "overlap must not be negative", reason="NEGATIVE_OVERLAP", field="overlap"
            )
        if overlap > self._max_overlap:
            raise InvalidArgument(
                f"overlap must be at most {self._max_overlap} (APIKEYS_MAX_ROTATION_OVERLAP)",
                reason="OVERLAP_TOO_LONG",
                field="overlap",
            )
        request = validate_request_id(request_id)
        now = self._clock.now()
        successor_id = new_id("key")
        with self._store.transaction() as tx:
            if request is not None:
                asked = _fingerprint("rotate", tenant, key_id, str(overlap // timedelta(0, 0, 1)))
                claim = RequestRecord(caller.tenant_id, request, asked, successor_id, now)
                # Before the key's state: a retry finds the key already rotated.
                self._claim(tx, claim, f"rotated key {key_id} to")
            old = self._active_for_change(tx, tenant, key_id, "rotate", now, allow_expired=False)
            end = now + overlap
            if old.expire_time is not None:
                end = min(end, old.expire_time)
            issued = self._issue(
                tenant, old.name, old.scopes, None, now, rotated_from=old.id, key_id=successor_id
            )
            previous = replace(old, replaced_by=issued.key.id, expire_time=end)
            tx.insert_key(issued.key)
            tx.update_key(previous)
            self._record(
                tx, issued.key, EventAction.CREATED, caller.key_id, now, self._created(issued.key)
            )
            self._record(
                tx, old, EventAction.ROTATED, caller.key_id, now, self._diff(old, previous)
            )
        return Rotation(issued, previous)

    def revoke(self, caller: Caller, tenant_id: str, key_id: str, reason: str) -> KeyRecord:
        caller.require(reserved.MANAGE)
        tenant = caller.resolve_tenant(tenant_id)
        validate_key_id(key_id)
        validate_reason(reason)
        now = self._clock.now()
        with self._store.transaction() as tx:
            key = tx.get_key_for_update(tenant, key_id)
            if key is None:
                raise _not_found(key_id, tenant)
            if key.revoke_time is not None:
                return key  # idempotent: already revoked, nothing changes, no event
            revoked = replace(key, revoke_time=now, revoke_reason=reason)
            tx.update_key(revoked)
            self._record(tx, key, EventAction.REVOKED, caller.key_id, now, self._diff(key, revoked))
        return revoked

    def revoke_leaked(
        self, caller: Caller, leaked: Sequence[str], source: str, url: str
    ) -> list[LeakResult]:
        """Revokes the keys of leaked secrets and records the leak (one LEAKED event each).

        A tenant key reaches its own tenant's keys only: another tenant's is NOT_FOUND, as if
        it did not exist. A key already revoked is ALREADY_REVOKED; its leak is recorded once
        (a second report of the same key changes nothing). The results follow ``leaked``.
        """
        caller.require(reserved.MANAGE)
        if len(leaked) > MAX_LEAKED_SECRETS:
            raise InvalidArgument(
                f"at most {MAX_LEAKED_SECRETS} secrets a call, not {len(leaked)}; split the report",
                reason="TOO_MANY_SECRETS",
                field="secrets",
            )
        for field, value, limit in (
            ("source", source, MAX_LEAK_SOURCE_LENGTH),
            ("url", url, MAX_LEAK_URL_LENGTH),
        ):
            if len(value) > limit:
                raise InvalidArgument(
                    f"{field} is at most {limit} characters",
                    reason="LEAK_REPORT_TOO_LONG",
                    field=field,
                )
        now = self._clock.now()
        results: list[LeakResult] = []
        with self._store.transaction() as tx:
            for secret in leaked:
                if not self._format.is_well_formed(secret):
                    results.append(LeakResult("", LeakOutcome.MALFORMED))
                    continue
                hint = self._format.hint(secret)
                key = tx.get_key_by_digest_for_update(digest(secret))
                if key is None or not (caller.is_platform or key.tenant_id == caller.tenant_id):
                    results.append(LeakResult(hint, LeakOutcome.NOT_FOUND))
                    continue
                outcome = (
                    LeakOutcome.ALREADY_REVOKED
                    if key.revoke_time is not None
                    else LeakOutcome.REVOKED
                )
                results.append(LeakResult(hint, outcome, key.id))
                if key.leak_time is not None:
                    continue  # reported before: recorded once
                marked = replace(
                    key,
                    revoke_time=key.revoke_time or now,
                    revoke_reason=key.revoke_reason if key.revoke_time else LEAKED_REASON,
                    leak_time=now,
                    leak_source=source,
                    leak_url=url,
                )
                tx.update_key(marked)
                self._record(
                    tx, key, EventAction.LEAKED, caller.key_id, now, self._diff(key, marked)
                )
        return results

    # -- helpers -----------------------------------------------------------------------------

    def _issue(
        self,
        tenant_id: str,
        name: str,
        scopes: frozenset[str],
        expire_time: datetime | None,
        now: datetime,
        rotated_from: str | None = None,
        key_id: str | None = None,
    ) -> IssuedKey:
        secret = self._format.generate()
        key = KeyRecord(
            id=key_id or new_id("key"),
            tenant_id=tenant_id,
            name=name,
            scopes=scopes,
            hint=self._format.hint(secret),
            digest=digest(secret),
            create_time=now,
            expire_time=expire_time,
            rotated_from=rotated_from,
        )
        return IssuedKey(key, secret)

    @staticmethod
    def _claim(tx: KeyWriter, claim: RequestRecord, done: str) -> None:
        """Records the request's id with the key it makes, in the key's transaction, or refuses
        a retry. A retry is ALREADY_EXISTS, not FAILED_PRECONDITION: the thing it asks to
        create exists, and no change of state will ever make the retry succeed; a client can
        tell "my first attempt worked" from the conflicts FAILED_PRECONDITION reports."""
        stale_before = claim.create_time - REQUEST_ID_TTL
        tx.prune_requests(stale_before, REQUEST_PRUNE_BATCH)
        earlier = tx.claim_request(claim, stale_before)
        if earlier is None:
            return
        if earlier.fingerprint != claim.fingerprint:
            raise InvalidArgument(
                f"request_id {shown(claim.request_id)} reused for a different request "
                f"(that one made key {earlier.key_id} at {_show_time(earlier.create_time)}); "
                "send a new request_id with each new request"
            )
        raise AlreadyExists(
            f"this request was already done: request_id {shown(claim.request_id)} {done} "
            f"{earlier.key_id} at {_show_time(earlier.create_time)}; its secret was shown only "
            f"in that response and cannot be shown again. If the secret was lost, revoke key "
            f"{earlier.key_id} and create a new key",
            reason="REQUEST_ALREADY_DONE",
            field="request_id",
        )

    @staticmethod
    def _active_for_change(
        tx: KeyWriter, tenant: str, key_id: str, verb: str, now: datetime, allow_expired: bool
    ) -> KeyRecord:
        key = tx.get_key_for_update(tenant, key_id)
        if key is None:
            raise _not_found(key_id, tenant)
        state = key.state(now)
        if state is KeyState.REVOKED:
            raise FailedPrecondition(
                f"key {key_id} is revoked and cannot {verb}; create a new key",
                reason="KEY_REVOKED",
            )
        if verb == "rotate" and key.replaced_by is not None:
            raise FailedPrecondition(
                f"key {key_id} was already rotated to {key.replaced_by}; rotate that key instead",
                reason="KEY_ALREADY_ROTATED",
            )
        if state is KeyState.EXPIRED and not allow_expired:
            raise FailedPrecondition(
                f"key {key_id} has expired and cannot {verb}; create a new key",
                reason="KEY_EXPIRED",
            )
        return key

    @staticmethod
    def _created(key: KeyRecord) -> tuple[FieldChange, ...]:
        changes = [
            FieldChange("name", "", key.name),
            FieldChange("scopes", "", _show_scopes(key.scopes)),
        ]
        if key.expire_time is not None:
            changes.append(FieldChange("expire_time", "", _show_time(key.expire_time)))
        if key.rotated_from is not None:
            changes.append(FieldChange("rotated_from", "", key.rotated_from))
        return tuple(changes)

    @staticmethod
    def _diff(before: KeyRecord, after: KeyRecord) -> tuple[FieldChange, ...]:
        shown_fields: dict[str, Callable[[KeyRecord], str]] = {
            "name": lambda k: k.name,
            "scopes": lambda k: _show_scopes(k.scopes),
            "expire_time": lambda k: _show_time(k.expire_time),
            "revoke_time": lambda k: _show_time(k.revoke_time),
            "revoke_reason": lambda k: k.revoke_reason,
            "replaced_by": lambda k: k.replaced_by or "",
            "leak_time": lambda k: _show_time(k.leak_time),
            "leak_source": lambda k: k.leak_source,
            "leak_url": lambda k: k.leak_url,
        }
        changes = []
        for field, show in shown_fields.items():
            old, new = show(before), show(after)
            if old != new:
                changes.append(FieldChange(field, old, new))
        return tuple(changes)

    @staticmethod
    def _record(
        tx: KeyWriter,
        key: KeyRecord,
        action: EventAction,
        actor_key_id: str,
        now: datetime,
        changes: tuple[FieldChange, ...],
    ) -> None:
        """Every change to a key is one audit event and one entry of the change feed."""
        event = KeyEvent(new_id("evt"), now, key.tenant_id, key.id, action, actor_key_id, changes)
        tx.insert_event(event)
        tx.record_change(key, action, now)

    @staticmethod
    def _page(
        items: list[T], limit: int, fingerprint: str, cursor_of: Callable[[T], pagination.Cursor]
    ) -> Page[T]:
        if len(items) <= limit:
            return Page(items, "")
        page = items[:limit]
        return Page(page, pagination.encode(cursor_of(page[-1]), fingerprint))


def _not_found(key_id: str, tenant: str) -> NotFound:
    return NotFound(f"key {key_id} not found in tenant {shown(tenant)}", reason="KEY_NOT_FOUND")
