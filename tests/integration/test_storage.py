"""SqlKeyStore directly on SQLite and PostgreSQL: round trips, ordering, transactions, errors."""

import hashlib
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import grpc
import pytest
from sqlalchemy.exc import StatementError

from apikeys.v1 import key_verifier_pb2, key_verifier_pb2_grpc
from apikeys_server.app import create_server
from apikeys_server.domain.errors import Aborted, Unavailable
from apikeys_server.domain.key_format import KeyFormat
from apikeys_server.domain.manager import new_id
from apikeys_server.domain.pagination import Cursor
from apikeys_server.domain.ports import KeyQuery
from apikeys_server.domain.records import KeyRecord, VerifyRecord
from apikeys_server.storage import migrate
from apikeys_server.storage.database import open_database
from apikeys_server.storage.repository import SqlKeyStore
from tests.support import server_settings

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/x"
T0 = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Iterator[SqlKeyStore]:
    database = open_database(database_url, pool_size=2)
    migrate.upgrade(database)
    yield SqlKeyStore(database)
    database.dispose()


def _record(tenant: str = "acme", create_time: datetime = T0, **fields: object) -> KeyRecord:
    values: dict[str, object] = {
        "id": new_id("key"),
        "tenant_id": tenant,
        "name": "crm-sync-prod",
        "scopes": frozenset({"passes:read", "customers:write"}),
        "hint": "ak_Zx8q…",
        "digest": hashlib.sha256(os.urandom(16)).digest(),
        "create_time": create_time,
    }
    values.update(fields)
    return KeyRecord(**values)  # type: ignore[arg-type]


def _insert(store: SqlKeyStore, *records: KeyRecord) -> None:
    with store.transaction() as tx:
        for record in records:
            tx.insert_key(record)


def _assert_utc(*values: datetime | None) -> None:
    for value in values:
        assert value is not None
        assert value.tzinfo is not None
        assert value.utcoffset() == timedelta(0)


class TestRoundTrip:
    def test_insert_then_get_and_find_by_digest(self, store: SqlKeyStore) -> None:
        """A record comes back equal by id, every field intact; by digest, what Verify reads."""
        record = _record(
            expire_time=T0 + timedelta(days=30, microseconds=1),
            revoke_time=T0 + timedelta(seconds=1, microseconds=999999),
            revoke_reason="leaked ‘in’ CI — 🔑",
            last_used_time=T0 + timedelta(microseconds=7),
            replaced_by="key_next",
            rotated_from="key_prev",
        )
        _insert(store, record)
        by_id = store.get_key("acme", record.id)
        by_digest = store.find_by_digest(record.digest)
        assert by_id == record
        assert by_digest == VerifyRecord.of(record)
        assert by_digest.revoked
        assert store._find_by_digest_via_connection(record.digest) == by_digest

    def test_datetimes_come_back_aware_utc_with_microseconds(self, store: SqlKeyStore) -> None:
        """Aware datetimes in any zone come back as the same instant, in UTC, microseconds kept."""
        plus_two = timezone(timedelta(hours=2))
        record = _record(
            create_time=datetime(2024, 6, 1, 12, 0, 0, 1, tzinfo=plus_two),
            expire_time=datetime(2030, 1, 1, 0, 0, 0, 999999, tzinfo=UTC),
            last_used_time=datetime(2024, 6, 1, 10, 0, 0, 500000, tzinfo=UTC),
        )
        _insert(store, record)
        stored = store.get_key("acme", record.id)
        assert stored is not None
        _assert_utc(stored.create_time, stored.expire_time, stored.last_used_time)
        assert stored.create_time == datetime(2024, 6, 1, 10, 0, 0, 1, tzinfo=UTC)
        assert stored.create_time.microsecond == 1
        assert stored.expire_time is not None
        assert stored.expire_time.microsecond == 999999
        assert stored.last_used_time == record.last_used_time

    def test_naive_datetimes_are_refused(self, store: SqlKeyStore) -> None:
        """A naive datetime never reaches the database: the write fails and nothing is stored."""
        record = _record(create_time=datetime(2024, 1, 1))
        with pytest.raises(StatementError, match="naive datetime"):
            _insert(store, record)
        assert store.get_key("acme", record.id) is None

    def test_unknown_lookups_answer_none(self, store: SqlKeyStore) -> None:
        """An unknown digest or id, or a known id under another tenant, answers None."""
        record = _record()
        _insert(store, record)
        assert store.find_by_digest(hashlib.sha256(b"nothing").digest()) is None
        assert store.get_key("acme", "key_unknown") is None
        assert store.get_key("globex", record.id) is None

    def test_digest_is_unique(self, store: SqlKeyStore) -> None:
        """A second key with the same digest is refused as a conflict (ABORTED), rolled back."""
        first = _record()
        _insert(store, first)
        clash = _record(digest=first.digest)
        with pytest.raises(Aborted) as raised:
            _insert(store, clash)
        assert raised.value.reason == "CONFLICT"
        assert store.get_key("acme", clash.id) is None
        assert store.find_by_digest(first.digest) == VerifyRecord.of(first)


class TestUpdate:
    def test_update_changes_mutable_fields_only(self, store: SqlKeyStore) -> None:
        """update_key writes name, scopes, times and links; id, digest, hint, create_time stay."""
        record = _record(last_used_time=T0)
        _insert(store, record)
        changed = replace(
            record,
            name="renamed",
            scopes=frozenset({"passes:write"}),
            expire_time=T0 + timedelta(hours=1, microseconds=3),
            revoke_time=T0 + timedelta(minutes=1),
            revoke_reason="rotated out",
            replaced_by="key_successor",
            hint="ak_XXXX…",
            create_time=T0 + timedelta(days=1),
            last_used_time=T0 + timedelta(days=2),
        )
        with store.transaction() as tx:
            tx.update_key(changed)
        stored = store.get_key("acme", record.id)
        assert stored == replace(
            changed,
            hint=record.hint,
            create_time=record.create_time,
            last_used_time=record.last_used_time,
        )

    def test_update_touches_one_key(self, store: SqlKeyStore) -> None:
        """Updating one key leaves its neighbours as they were."""
        one, two = _record(), _record()
        _insert(store, one, two)
        with store.transaction() as tx:
            tx.update_key(replace(one, name="changed"))
        assert store.get_key("acme", two.id) == two

    def test_get_key_for_update_reads_inside_the_transaction(self, store: SqlKeyStore) -> None:
        """Inside a transaction, a key is read (and locked on PostgreSQL) by tenant and id."""
        record = _record()
        _insert(store, record)
        with store.transaction() as tx:
            assert tx.get_key_for_update("acme", record.id) == record
            assert tx.get_key_for_update("globex", record.id) is None


class TestListKeys:
    def test_newest_first_ties_broken_by_id_descending(self, store: SqlKeyStore) -> None:
        """Keys list by create_time desc; equal create_times by id desc."""
        same = [_record(id=f"key_{c}") for c in "bdac"]
        older = _record(id="key_z", create_time=T0 - timedelta(microseconds=1))
        newer = _record(id="key_a0", create_time=T0 + timedelta(microseconds=1))
        _insert(store, *same, older, newer)
        listed = [k.id for k in store.list_keys(KeyQuery("acme"), None, 100)]
        assert listed == ["key_a0", "key_d", "key_c", "key_b", "key_a", "key_z"]

    def test_cursor_resumes_strictly_after_the_last_item(self, store: SqlKeyStore) -> None:
        """Listing after a cursor inside a tie continues with the next id, skipping nothing."""
        _insert(store, *(_record(id=f"key_{c}") for c in "abcde"))
        after = store.list_keys(KeyQuery("acme"), Cursor(T0, "key_c"), 100)
        assert [k.id for k in after] == ["key_b", "key_a"]
        limited = store.list_keys(KeyQuery("acme"), None, 2)
        assert [k.id for k in limited] == ["key_e", "key_d"]

    def test_revoked_and_other_tenants_are_filtered(self, store: SqlKeyStore) -> None:
        """Revoked keys only with include_revoked; another tenant's keys never."""
        live = _record(id="key_live")
        revoked = _record(id="key_revoked", revoke_time=T0)
        foreign = _record(id="key_foreign", tenant="globex")
        _insert(store, live, revoked, foreign)
        assert [k.id for k in store.list_keys(KeyQuery("acme"), None, 10)] == ["key_live"]
        assert [k.id for k in store.list_keys(KeyQuery("acme", True), None, 10)] == [
            "key_revoked",
            "key_live",
        ]


class TestLastUsed:
    def test_touch_sets_and_only_moves_forward(self, store: SqlKeyStore) -> None:
        """touch_last_used sets a first time, moves it forward, and never moves it back."""
        one, two = _record(), _record(last_used_time=T0 + timedelta(hours=1))
        _insert(store, one, two)
        store.touch_last_used({one.id: T0, two.id: T0})
        assert store.get_key("acme", one.id).last_used_time == T0  # type: ignore[union-attr]
        assert store.get_key("acme", two.id).last_used_time == T0 + timedelta(hours=1)  # type: ignore[union-attr]
        later = T0 + timedelta(hours=2, microseconds=5)
        store.touch_last_used({one.id: later})
        store.touch_last_used({one.id: T0 + timedelta(minutes=1)})
        stored = store.get_key("acme", one.id)
        assert stored is not None
        assert stored.last_used_time == later
        _assert_utc(stored.last_used_time)

    def test_touch_of_unknown_keys_is_harmless(self, store: SqlKeyStore) -> None:
        """Touching ids that do not exist (e.g. deleted) writes nothing and raises nothing."""
        store.touch_last_used({})
        store.touch_last_used({"key_gone": T0})
        assert store.list_keys(KeyQuery("acme", True), None, 10) == []


class TestTransactions:
    def test_exception_rolls_back_everything(self, store: SqlKeyStore) -> None:
        """An exception inside a transaction leaves none of its writes behind."""
        existing = _record()
        _insert(store, existing)
        fresh = _record()
        with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
            tx.insert_key(fresh)
            tx.update_key(replace(existing, name="changed"))
            raise RuntimeError("boom")
        assert store.get_key("acme", fresh.id) is None
        assert store.find_by_digest(fresh.digest) is None
        assert store.get_key("acme", existing.id) == existing

    def test_committed_writes_are_seen_by_the_read_path(self, store: SqlKeyStore) -> None:
        """Once a transaction exits, the autocommit read engine sees its writes."""
        record = _record()
        assert store.find_by_digest(record.digest) is None
        _insert(store, record)
        assert store.find_by_digest(record.digest) == VerifyRecord.of(record)


class TestUnavailable:
    def test_unreachable_database_raises_unavailable(self) -> None:
        """Every store operation on a database nobody listens for raises Unavailable."""
        database = open_database(UNREACHABLE, pool_size=1)
        store = SqlKeyStore(database)
        try:
            with pytest.raises(Unavailable):
                store.find_by_digest(b"\x00" * 32)
            with pytest.raises(Unavailable):
                store.get_key("acme", "key_a")
            with pytest.raises(Unavailable):
                store.list_keys(KeyQuery("acme"), None, 10)
            with pytest.raises(Unavailable):
                store.touch_last_used({"key_a": T0})
            with pytest.raises(Unavailable), store.transaction() as tx:
                tx.insert_key(_record())
        finally:
            database.dispose()

    def test_server_answers_unavailable_not_internal(self) -> None:
        """A server whose database is down answers UNAVAILABLE, so callers fail closed and retry."""
        app = create_server(server_settings(UNREACHABLE, migrate_on_start=False))
        app.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = key_verifier_pb2_grpc.KeyVerifierStub(channel)
                key = KeyFormat("ak").generate()
                with pytest.raises(grpc.RpcError) as raised:
                    stub.Verify(
                        key_verifier_pb2.VerifyRequest(key=key, tenant_id="acme"),
                        metadata=(("x-api-key", key),),
                        timeout=10,
                    )
        finally:
            app.stop(grace=1.0)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unavailable" in (raised.value.details() or "")
