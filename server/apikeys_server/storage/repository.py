"""The SQL key store: lookups on the read engine, changes in transactions on the write engine."""

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from apikeys_server.domain.errors import FailedPrecondition, Unavailable
from apikeys_server.domain.manager import new_id
from apikeys_server.domain.pagination import Cursor
from apikeys_server.domain.ports import EVENT_INTERVAL, KeyQuery, Presented
from apikeys_server.domain.records import (
    EventAction,
    FieldChange,
    KeyEvent,
    KeyRecord,
    RequestRecord,
    VerifyRecord,
)
from apikeys_server.storage.database import Database
from apikeys_server.storage.errors import database_errors
from apikeys_server.storage.feed import append_changes, change_row
from apikeys_server.storage.models import UTCDateTime, api_keys, key_events, key_requests

# SQLSTATE query_canceled: the server's statement_timeout passed.
_STATEMENT_TIMEOUT = "57014"

_KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.tenant_id,
    api_keys.c.name,
    api_keys.c.scopes,
    api_keys.c.hint,
    api_keys.c.digest,
    api_keys.c.create_time,
    api_keys.c.expire_time,
    api_keys.c.revoke_time,
    api_keys.c.revoke_reason,
    api_keys.c.last_used_time,
    api_keys.c.replaced_by,
    api_keys.c.rotated_from,
    api_keys.c.leak_time,
    api_keys.c.leak_source,
    api_keys.c.leak_url,
    api_keys.c.presented_after_revocation_time,
    api_keys.c.presented_after_revocation_count,
)
_SELECT_KEYS = select(*_KEY_COLUMNS)
# What Verify reads (VerifyRecord): the digest is the one looked up; revoke_time only as a flag.
_VERIFY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.tenant_id,
    api_keys.c.name,
    api_keys.c.scopes,
    api_keys.c.expire_time,
    api_keys.c.revoke_time,
)
_BY_DIGEST = select(*_VERIFY_COLUMNS).where(api_keys.c.digest == bindparam("digest"))
_BY_DIGEST_FULL = _SELECT_KEYS.where(api_keys.c.digest == bindparam("digest"))
_BY_ID = _SELECT_KEYS.where(
    api_keys.c.tenant_id == bindparam("tenant_id"), api_keys.c.id == bindparam("key_id")
)
_TOUCH = (
    update(api_keys)
    .where(
        api_keys.c.id == bindparam("key_id"),
        or_(api_keys.c.last_used_time.is_(None), api_keys.c.last_used_time < bindparam("used")),
    )
    .values(last_used_time=bindparam("used"))
)
_PRESENTED_AT = bindparam("presented", type_=UTCDateTime())
_PRESENTED = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("key_id"))
    .values(
        presented_after_revocation_count=api_keys.c.presented_after_revocation_count
        + bindparam("count"),
        presented_after_revocation_time=case(
            (
                or_(
                    api_keys.c.presented_after_revocation_time.is_(None),
                    api_keys.c.presented_after_revocation_time
                    < bindparam("presented", type_=UTCDateTime()),
                ),
                _PRESENTED_AT,
            ),
            else_=api_keys.c.presented_after_revocation_time,
        ),
    )
)
# The tripwire's event, claimed in the database: the row's event time moves only if the last
# event (by any process or replica) is at least EVENT_INTERVAL old. On PostgreSQL a concurrent
# claim waits for the row lock and then re-checks the condition against the committed time, so
# of two flushes at once exactly one matches; SQLite serialises the writers.
_CLAIM_EVENT = (
    update(api_keys)
    .where(
        api_keys.c.id == bindparam("key_id"),
        or_(
            api_keys.c.presented_event_time.is_(None),
            api_keys.c.presented_event_time <= bindparam("due_before", type_=UTCDateTime()),
        ),
    )
    .values(presented_event_time=_PRESENTED_AT)
)
_REQUEST_KEY = (key_requests.c.caller_tenant_id, key_requests.c.request_id)
_CLAIM = {
    # Both wait for a concurrent transaction inserting the same key, then do nothing.
    "postgresql": postgresql.insert(key_requests)
    .on_conflict_do_nothing()
    .returning(key_requests.c.request_id),
    "sqlite": sqlite.insert(key_requests)
    .on_conflict_do_nothing()
    .returning(key_requests.c.request_id),
}
_RECLAIM_STALE = (
    update(key_requests)
    .where(
        key_requests.c.caller_tenant_id == bindparam("b_caller_tenant_id"),
        key_requests.c.request_id == bindparam("b_request_id"),
        key_requests.c.create_time < bindparam("b_stale_before"),
    )
    .values(
        fingerprint=bindparam("b_fingerprint"),
        key_id=bindparam("b_key_id"),
        create_time=bindparam("b_create_time"),
    )
)
_REQUEST_BY_ID = select(key_requests).where(
    key_requests.c.caller_tenant_id == bindparam("caller_tenant_id"),
    key_requests.c.request_id == bindparam("request_id"),
)


def _to_record(row: Sequence[Any], scopes: frozenset[str] | None = None) -> KeyRecord:
    """A record from a converted row of ``_KEY_COLUMNS`` (in KeyRecord's field order)."""
    scope_set = frozenset(row[3].split()) if scopes is None else scopes
    return KeyRecord(
        id=row[0],
        tenant_id=row[1],
        name=row[2],
        scopes=scope_set,
        hint=row[4],
        digest=bytes(row[5]),
        create_time=row[6],
        expire_time=row[7],
        revoke_time=row[8],
        revoke_reason=row[9],
        last_used_time=row[10],
        replaced_by=row[11],
        rotated_from=row[12],
        leak_time=row[13],
        leak_source=row[14],
        leak_url=row[15],
        presented_after_revocation_time=row[16],
        presented_after_revocation_count=row[17],
    )


def _to_verify_record(
    row: Sequence[Any], digest: bytes, scopes: frozenset[str] | None = None
) -> VerifyRecord:
    """A record from a converted row of ``_VERIFY_COLUMNS`` and the digest it was found by."""
    return VerifyRecord(
        id=row[0],
        tenant_id=row[1],
        name=row[2],
        scopes=frozenset(row[3].split()) if scopes is None else scopes,
        digest=digest,
        expire_time=row[4],
        revoked=row[5] is not None,
    )


class _DigestLookup:
    """``_BY_DIGEST`` as the driver runs it, and its rows as records.

    SQLAlchemy compiles the statement for the engine's dialect once, and its column types
    give the same bind and result conversions a Connection would apply. Skipped is what
    Connection.execute() adds to every call (execution context, Result, Row: some 30 µs,
    more than SQLite's own lookup). Records share their tenant, scope set and digest
    objects with the cache's key and with each other: less memory per cached key.
    """

    _SHARED_LIMIT = 4096

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        compiled = _BY_DIGEST.compile(dialect=dialect)
        self.sql = compiled.string
        self._positional = compiled.positional
        self._bind = api_keys.c.digest.type.dialect_impl(dialect).bind_processor(dialect)
        self._convert = [
            (index, processor)
            for index, column in enumerate(_VERIFY_COLUMNS)
            if (processor := column.type.dialect_impl(dialect).result_processor(dialect, None))
            is not None
        ]
        self.driver_error: type[Exception] = dialect.loaded_dbapi.Error
        self._scope_sets: dict[str, frozenset[str]] = {}

    def parameters(self, digest: bytes) -> Any:
        value = digest if self._bind is None else self._bind(digest)
        return (value,) if self._positional else {"digest": value}

    def record(self, row: Sequence[Any], digest: bytes) -> VerifyRecord:
        values = list(row)
        for index, processor in self._convert:
            values[index] = processor(values[index])
        values[1] = sys.intern(values[1])  # the tenant id
        scopes = values[3]
        scope_set = self._scope_sets.get(scopes)
        if scope_set is None:
            if len(self._scope_sets) >= self._SHARED_LIMIT:
                self._scope_sets.clear()
            scope_set = self._scope_sets[scopes] = frozenset(scopes.split())
        # The digest equals the row's (the lookup matched it): shared with the cache's key.
        return _to_verify_record(values, digest, scope_set)


def key_row(key: KeyRecord) -> dict[str, Any]:
    """The api_keys row of a record (also used by the benchmark's bulk loader)."""
    return {
        "id": key.id,
        "tenant_id": key.tenant_id,
        "name": key.name,
        "scopes": " ".join(sorted(key.scopes)),
        "hint": key.hint,
        "digest": key.digest,
        "create_time": key.create_time,
        "expire_time": key.expire_time,
        "revoke_time": key.revoke_time,
        "revoke_reason": key.revoke_reason,
        "last_used_time": key.last_used_time,
        "replaced_by": key.replaced_by,
        "rotated_from": key.rotated_from,
        "leak_time": key.leak_time,
        "leak_source": key.leak_source,
        "leak_url": key.leak_url,
        "presented_after_revocation_time": key.presented_after_revocation_time,
        "presented_after_revocation_count": key.presented_after_revocation_count,
    }


def _to_event(row: Any) -> KeyEvent:
    changes = tuple(FieldChange(c["field"], c["old"], c["new"]) for c in json.loads(row.changes))
    return KeyEvent(
        id=row.id,
        time=row.time,
        tenant_id=row.tenant_id,
        key_id=row.key_id,
        action=EventAction(row.action),
        actor_key_id=row.actor_key_id,
        changes=changes,
    )


def _newest_first_after(
    statement: Select[Any], time_col: Any, id_col: Any, after: Cursor | None
) -> Select[Any]:
    if after is not None:
        statement = statement.where(
            or_(time_col < after.time, and_(time_col == after.time, id_col < after.id))
        )
    return statement.order_by(time_col.desc(), id_col.desc())


class SqlTransaction:
    def __init__(self, connection: Connection, for_update: bool) -> None:
        self._connection = connection
        self._for_update = for_update
        self.changes: list[dict[str, Any]] = []

    def get_key_for_update(self, tenant_id: str, key_id: str) -> KeyRecord | None:
        statement = _BY_ID.with_for_update() if self._for_update else _BY_ID
        row = self._connection.execute(
            statement, {"tenant_id": tenant_id, "key_id": key_id}
        ).first()
        return None if row is None else _to_record(row)

    def get_key_by_digest_for_update(self, digest: bytes) -> KeyRecord | None:
        statement = _BY_DIGEST_FULL.with_for_update() if self._for_update else _BY_DIGEST_FULL
        row = self._connection.execute(statement, {"digest": digest}).first()
        return None if row is None else _to_record(row)

    def insert_key(self, key: KeyRecord) -> None:
        self._connection.execute(insert(api_keys), key_row(key))

    def update_key(self, key: KeyRecord) -> None:
        values = key_row(key)
        # Written only by their own batched updates (last used, the tripwire).
        for immutable in (
            "id",
            "tenant_id",
            "digest",
            "create_time",
            "hint",
            "last_used_time",
            "presented_after_revocation_time",
            "presented_after_revocation_count",
        ):
            del values[immutable]
        self._connection.execute(update(api_keys).where(api_keys.c.id == key.id).values(**values))

    def insert_event(self, event: KeyEvent) -> None:
        changes = [
            {"field": c.field, "old": c.old_value, "new": c.new_value} for c in event.changes
        ]
        self._connection.execute(
            insert(key_events),
            {
                "id": event.id,
                "time": event.time,
                "tenant_id": event.tenant_id,
                "key_id": event.key_id,
                "action": event.action.value,
                "actor_key_id": event.actor_key_id,
                "changes": json.dumps(changes, separators=(",", ":")),
            },
        )

    def record_change(self, key: KeyRecord, kind: EventAction, time: datetime) -> None:
        # Appended at the end of the transaction: see storage/feed.py for why.
        self.changes.append(change_row(key.id, key.tenant_id, key.digest, kind, time))

    def claim_request(self, request: RequestRecord, stale_before: datetime) -> RequestRecord | None:
        row = {
            "caller_tenant_id": request.caller_tenant_id,
            "request_id": request.request_id,
            "fingerprint": request.fingerprint,
            "key_id": request.key_id,
            "create_time": request.create_time,
        }
        # PostgreSQL (read committed): the insert waits for a concurrent one of the same id and
        # then does nothing; each later statement sees what that one committed. SQLite: writers
        # are serialised (BEGIN IMMEDIATE), so there is nothing concurrent to wait for.
        connection = self._connection
        # RETURNING, not rowcount: psycopg reports no rowcount for INSERT ... ON CONFLICT.
        if connection.execute(_CLAIM[connection.dialect.name], row).first() is not None:
            return None
        reclaim = {"b_" + name: value for name, value in row.items()}
        reclaim["b_stale_before"] = stale_before
        if connection.execute(_RECLAIM_STALE, reclaim).rowcount:
            return None
        found = connection.execute(_REQUEST_BY_ID, row).first()
        if found is None:  # deleted between the statements: only a stale row is ever deleted
            raise FailedPrecondition("the change conflicts with a concurrent one; retry")
        return RequestRecord(
            caller_tenant_id=found.caller_tenant_id,
            request_id=found.request_id,
            fingerprint=found.fingerprint,
            key_id=found.key_id,
            create_time=found.create_time,
        )

    def prune_requests(self, before: datetime, limit: int) -> None:
        # SKIP LOCKED (PostgreSQL; SQLite has no FOR UPDATE and no concurrent writers): rows
        # another create is pruning are left to it, so creates never queue behind each other.
        expired = (
            select(*_REQUEST_KEY)
            .where(key_requests.c.create_time < before)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        self._connection.execute(delete(key_requests).where(tuple_(*_REQUEST_KEY).in_(expired)))


# Told, after each commit, the digests it changed and their feed positions.
CommitListener = Callable[[list[bytes], list[int]], None]


class SqlKeyStore:
    """Keys in SQL. Each committed change is handed to ``on_commit`` before the transaction's
    caller resumes: this process evicts it at once; others learn of it from the feed."""

    def __init__(
        self,
        database: Database,
        on_commit: CommitListener = lambda digests, positions: None,
        serialize_feed: bool = True,
    ) -> None:
        self._database = database
        self._read = database.read_engine
        self._write = database.write_engine
        # SQLite serialises writers with BEGIN IMMEDIATE; PostgreSQL locks the row.
        self._for_update = not database.is_sqlite
        self._by_digest = _DigestLookup(self._read)
        self._serialize_feed = serialize_feed
        self._on_commit = on_commit

    def find_by_digest(self, digest: bytes) -> VerifyRecord | None:
        """The Verify lookup on a cache miss: one round trip, no transaction, no Result object.

        Runs the statement SQLAlchemy compiled once on a connection from the read engine's
        pool. Should the driver fail (a raw checkout leaves its errors unwrapped), the
        connection is discarded and the lookup runs once more the ordinary way, which maps
        the error and handles a lost database as every other query does: a pooled connection
        gone stale (the database restarted) costs one retry, not a failed Verify. A lookup
        that failed because its read bound passed is not retried: that would double the wait.
        """
        lookup = self._by_digest
        try:
            with database_errors():
                connection = self._read.raw_connection()
        except lookup.driver_error as error:
            # A new connection that could not be made (the pool's connect leaves the driver's
            # error unwrapped): nothing stale to retry, and a retry would wait as long again.
            raise Unavailable(
                "the key database is unavailable; retry later", reason="DATABASE_UNAVAILABLE"
            ) from error
        failed = timed_out = False
        try:
            cursor = connection.cursor()
            cursor.execute(lookup.sql, lookup.parameters(digest))
            row = cursor.fetchone()
            cursor.close()
        except lookup.driver_error as error:
            timed_out = (
                self._database.deadline_passed(connection.dbapi_connection)
                or getattr(error, "sqlstate", None) == _STATEMENT_TIMEOUT
            )
            connection.invalidate()
            failed = True
        finally:
            connection.close()
        if timed_out:
            raise Unavailable(
                "the key database did not answer in time; retry later",
                reason="DATABASE_UNAVAILABLE",
            )
        if failed:
            return self._find_by_digest_via_connection(digest)
        return None if row is None else lookup.record(row, digest)

    def _find_by_digest_via_connection(self, digest: bytes) -> VerifyRecord | None:
        with database_errors(), self._read.connect() as connection:
            row = connection.execute(_BY_DIGEST, {"digest": digest}).first()
        return None if row is None else _to_verify_record(row, digest)

    def get_key(self, tenant_id: str, key_id: str) -> KeyRecord | None:
        with database_errors(), self._read.connect() as connection:
            row = connection.execute(_BY_ID, {"tenant_id": tenant_id, "key_id": key_id}).first()
        return None if row is None else _to_record(row)

    def list_keys(self, query: KeyQuery, after: Cursor | None, limit: int) -> list[KeyRecord]:
        statement = _SELECT_KEYS.where(api_keys.c.tenant_id == query.tenant_id)
        if not query.include_revoked:
            statement = statement.where(api_keys.c.revoke_time.is_(None))
        if query.name_prefix:
            # LIKE ignores case on SQLite; the substr comparison keeps the match exact everywhere.
            statement = statement.where(
                api_keys.c.name.startswith(query.name_prefix, autoescape=True),
                func.substr(api_keys.c.name, 1, len(query.name_prefix)) == query.name_prefix,
            )
        statement = _newest_first_after(statement, api_keys.c.create_time, api_keys.c.id, after)
        with database_errors(), self._read.connect() as connection:
            rows = connection.execute(statement.limit(limit)).all()
        return [_to_record(row) for row in rows]

    def list_events(
        self, tenant_id: str, key_id: str | None, after: Cursor | None, limit: int
    ) -> list[KeyEvent]:
        statement = select(key_events).where(key_events.c.tenant_id == tenant_id)
        if key_id is not None:
            statement = statement.where(key_events.c.key_id == key_id)
        statement = _newest_first_after(statement, key_events.c.time, key_events.c.id, after)
        with database_errors(), self._read.connect() as connection:
            rows = connection.execute(statement.limit(limit)).all()
        return [_to_event(row) for row in rows]

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        with database_errors(), self._write.begin() as connection:
            tx = SqlTransaction(connection, self._for_update)
            yield tx
            positions = append_changes(connection, tx.changes, self._serialize_feed)
        if tx.changes:
            self._on_commit([change["digest"] for change in tx.changes], positions)

    def record_presented(self, presented: Sequence[Presented]) -> set[str]:
        """Adds the tripwire's counts and latest times, and claims and writes the events due,
        in one transaction (see the KeyStore port). Rows in key order: two processes flushing
        the same keys lock them in the same order and never deadlock."""
        if not presented:
            return set()
        ordered = sorted(presented, key=lambda p: p.key_id)
        params = [{"key_id": p.key_id, "count": p.count, "presented": p.time} for p in ordered]
        evented: set[str] = set()
        with database_errors(), self._write.begin() as connection:
            connection.execute(_PRESENTED, params)
            tx = SqlTransaction(connection, for_update=False)
            for p in ordered:
                if not p.event:
                    continue
                claim = {
                    "key_id": p.key_id,
                    "presented": p.time,
                    "due_before": p.time - EVENT_INTERVAL,
                }
                if not connection.execute(_CLAIM_EVENT, claim).rowcount:
                    continue  # another process wrote this key's event within the interval
                evented.add(p.key_id)
                tx.insert_event(
                    KeyEvent(
                        new_id("evt"),
                        p.time,
                        p.tenant_id,
                        p.key_id,
                        EventAction.PRESENTED_AFTER_REVOCATION,
                        p.presenter,
                        (FieldChange("presented_after_revocation_time", "", p.time.isoformat()),),
                    )
                )
        return evented

    def touch_last_used(self, used: Mapping[str, datetime]) -> None:
        if not used:
            return
        # In key order, like record_presented: two processes' batches never deadlock.
        params = [{"key_id": key_id, "used": when} for key_id, when in sorted(used.items())]
        with database_errors(), self._write.begin() as connection:
            connection.execute(_TOUCH, params)
