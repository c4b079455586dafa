"""The change feed: recorded with each change, read in order, pruned, followed by every process.

Replicas here are in-process Apps on one database (each with its own cache and follower);
tests/e2e/test_replicas.py does the same with separate processes.
"""

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from sqlalchemy import Engine, create_engine, text

from apikeys.v1 import api_key_pb2, key_verifier_pb2
from apikeys_client import ApiKeysClient, FailedPrecondition, InvalidArgument, PermissionDenied
from apikeys_server.domain.records import EventAction
from apikeys_server.storage.cache import KeyCache
from apikeys_server.storage.database import open_database
from apikeys_server.storage.feed import SqlChangeFeed, append_changes, change_row
from apikeys_server.storage.follower import FeedFollower
from tests.support import FakeClock, RunningServer, running_server, server_settings, settle

SCOPES = ["passes:read"]
VALID = key_verifier_pb2.VERIFY_CODE_VALID
REVOKED = key_verifier_pb2.VERIFY_CODE_REVOKED
EXPIRED = key_verifier_pb2.VERIFY_CODE_EXPIRED
INSUFFICIENT_SCOPE = key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
PROPAGATION_BOUND = 2.0  # seconds a test waits for another replica to see a change
STALE_WATCH = 1.0  # seconds the negative controls watch a replica stay stale


def _feed(server: RunningServer) -> SqlChangeFeed:
    return SqlChangeFeed(server.app.services.database)


def _changes_after(server: RunningServer, position: int) -> list[tuple[str, EventAction]]:
    batch = _feed(server).read_changes(position, 1000)
    return [(change.key_id, change.kind) for change in batch.changes]


class TestRecording:
    def test_each_change_is_one_entry_in_commit_order(self, server: RunningServer) -> None:
        """Create, update, rotate (new key + old key) and revoke each append, in that order."""
        start = _feed(server).head()
        with server.client() as client:
            key = client.create_key("svc", SCOPES, tenant_id="acme").key
            client.update_key(key.id, tenant_id="acme", scopes=["passes:write"])
            successor = client.rotate_key(key.id, timedelta(hours=1), tenant_id="acme").key
            client.revoke_key(successor.id, tenant_id="acme")
        assert _changes_after(server, start) == [
            (key.id, EventAction.CREATED),
            (key.id, EventAction.UPDATED),
            (successor.id, EventAction.CREATED),
            (key.id, EventAction.ROTATED),
            (successor.id, EventAction.REVOKED),
        ]
        positions = [c.position for c in _feed(server).read_changes(start, 1000).changes]
        assert positions == sorted(set(positions))

    def test_refused_changes_record_nothing(self, server: RunningServer) -> None:
        """A change that fails (not found, revoked, repeated revoke) adds nothing to the feed."""
        with server.client() as client:
            key = client.create_key("svc", SCOPES, tenant_id="acme").key
            client.revoke_key(key.id, tenant_id="acme")
            head = _feed(server).head()
            client.revoke_key(key.id, tenant_id="acme")  # idempotent: no change
            with pytest.raises(FailedPrecondition):
                client.rotate_key(key.id, timedelta(0), tenant_id="acme")
        assert _feed(server).head() == head

    def test_feed_holds_no_secret(self, server: RunningServer) -> None:
        """The feed stores ids, kinds and the digest for eviction, never the secret."""
        with server.client() as client:
            secret = client.create_key("svc", SCOPES, tenant_id="acme").secret
        batch = _feed(server).read_changes(0, 1000)
        stored = repr([(c.key_id, c.tenant_id, c.kind, c.digest) for c in batch.changes])
        assert secret not in stored and secret.rsplit("_", 1)[-1] not in stored


@pytest.mark.postgres
class TestCommitOrder:
    @staticmethod
    def _interleave(url: str, serialize: bool) -> tuple[bool, set[int], set[int]]:
        """Writer A takes a position and holds its transaction open; writer B appends and
        commits; a consumer reads; then A commits and the consumer reads on from where it was.
        Returns (B had to wait for A, positions the consumer saw, positions written)."""
        database = open_database(url, pool_size=2)
        feed = SqlChangeFeed(database)
        try:
            position = feed.head()
            row = change_row(
                "key_order", "acme", b"\x01" * 32, EventAction.UPDATED, FakeClock().now()
            )
            with database.write_engine.connect() as a:
                held = a.begin()
                written = set(append_changes(a, [row], serialize))
                b_committed = threading.Event()

                def writer_b() -> None:
                    with database.write_engine.begin() as b:
                        written.update(append_changes(b, [row], serialize))
                    b_committed.set()

                thread = threading.Thread(target=writer_b)
                thread.start()
                b_waited = not b_committed.wait(0.5)
                seen = {c.position for c in feed.read_changes(position, 100).changes}
                position = max(seen, default=position)
                held.commit()
            thread.join(10)
            seen |= {c.position for c in feed.read_changes(position, 100).changes}
            return b_waited, seen, written
        finally:
            database.dispose()

    def test_a_later_position_never_commits_first(self, postgres_url: str) -> None:
        """With the feed lock, B waits for A, and a consumer following positions sees both."""
        b_waited, seen, written = self._interleave(postgres_url, serialize=True)
        assert b_waited
        assert seen == written

    def test_negative_control_without_the_lock_a_change_is_skipped(self, postgres_url: str) -> None:
        """Without it, B commits the higher position first and the consumer skips A's."""
        b_waited, seen, written = self._interleave(postgres_url, serialize=False)
        assert not b_waited
        assert len(written - seen) == 1


class TestPruning:
    def test_prune_drops_old_changes_and_moves_the_horizon(
        self, server: RunningServer, clock: FakeClock
    ) -> None:
        """Changes older than the retention go; the head stays; new positions continue above."""
        feed = _feed(server)
        with server.client() as client:
            for index in range(3):
                client.create_key(f"old-{index}", SCOPES, tenant_id="acme")
            old_head = feed.head()
            clock.advance(timedelta(days=8))
            client.create_key("recent", SCOPES, tenant_id="acme")
            head = feed.head()
            assert feed.prune(clock.now() - timedelta(days=7)) >= 3
            batch = feed.read_changes(0, 1000)
            assert batch.pruned_through == old_head
            assert [c.position for c in batch.changes] == [head]
            assert feed.head() == head
            assert feed.prune(clock.now() - timedelta(days=30)) == 0
            clock.advance(timedelta(days=8))
            assert feed.prune(clock.now() - timedelta(days=7)) == 1  # everything
            assert feed.head() == head
            client.create_key("after", SCOPES, tenant_id="acme")
        assert feed.head() > head  # never a reused position

    def test_a_consumer_behind_the_horizon_clears_its_cache(
        self, server: RunningServer, clock: FakeClock
    ) -> None:
        """A follower whose next change was pruned cannot know what changed: it forgets all."""
        feed = _feed(server)
        cache = KeyCache(10, 3600.0, 10, 3600.0)
        follower = FeedFollower(
            feed, cache, clock, poll_seconds=1.0, max_staleness=10.0, retention=timedelta(days=7)
        )
        assert follower.catch_up()
        with server.client() as client:
            created = client.create_key("svc", SCOPES, tenant_id="acme")
            cache.put(b"\x02" * 32, None, cache.generation)  # an unrelated entry
            clock.advance(timedelta(days=8))
            feed.prune(clock.now() - timedelta(days=7))
            assert follower.catch_up()
        assert cache.sizes() == (0, 0)
        assert follower.position == feed.head() >= 1
        assert created.key.id  # its change is behind the horizon, not replayed


def _replica(url: str, **overrides: object) -> Iterator[RunningServer]:
    settings = server_settings(url, migrate_on_start=False, cache_ttl_seconds=3600.0, **overrides)
    with running_server(settings) as server:
        yield server


@pytest.fixture
def replicas(postgres_url: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    """Two replicas on one PostgreSQL database, both following the feed."""
    engine = create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE api_keys, key_events"))
    engine.dispose()
    for a in _replica(postgres_url):
        for b in _replica(postgres_url):
            yield a, b


@pytest.fixture
def unfollowing_replicas(postgres_url: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    """The negative control: B does not follow the feed (its cache lives its TTL)."""
    for a in _replica(postgres_url):
        for b in _replica(postgres_url, follow_feed=False):
            yield a, b


def _until(
    code: int, client: ApiKeysClient, secret: str, scopes: list[str], bound: float
) -> float | None:
    """Seconds until Verify through ``client`` answers ``code``, or None if not within ``bound``."""
    started = time.monotonic()
    while time.monotonic() - started < bound:
        if client.verify(secret, scopes, tenant_id="acme").code == code:
            return time.monotonic() - started
    return None


def _warm(a: ApiKeysClient, b: ApiKeysClient, scopes: list[str]) -> tuple[str, str]:
    created = a.create_key("svc", scopes, tenant_id="acme")
    assert b.verify(created.secret, scopes, tenant_id="acme").code == VALID  # now cached in B
    return created.key.id, created.secret


def _terminate_listeners(admin: Engine) -> int:
    """Kills the LISTEN connections of this database (once they are back, after a kill)."""
    deadline = time.monotonic() + 5.0
    killed = 0
    while not killed and time.monotonic() < deadline:
        with admin.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                )
            ).scalar_one()
    return int(killed)


@pytest.mark.postgres
class TestPropagation:
    def test_revoke_update_and_rotate_reach_another_replica(
        self, replicas: tuple[RunningServer, RunningServer]
    ) -> None:
        """A change made through A is answered by B (key warm in B's cache) within the bound."""
        a, b = replicas
        with a.client() as ca, b.client(a.admin_key) as cb:
            for _ in range(10):
                key_id, secret = _warm(ca, cb, SCOPES)
                ca.revoke_key(key_id, tenant_id="acme")
                assert _until(REVOKED, cb, secret, SCOPES, PROPAGATION_BOUND) is not None

                key_id, secret = _warm(ca, cb, ["passes:read", "passes:write"])
                ca.update_key(key_id, tenant_id="acme", scopes=["passes:read"])
                assert (
                    _until(INSUFFICIENT_SCOPE, cb, secret, ["passes:write"], PROPAGATION_BOUND)
                    is not None
                )

                key_id, secret = _warm(ca, cb, SCOPES)
                ca.rotate_key(key_id, timedelta(0), tenant_id="acme")
                assert _until(EXPIRED, cb, secret, SCOPES, PROPAGATION_BOUND) is not None

    def test_negative_control_without_the_feed_the_replica_stays_stale(
        self, unfollowing_replicas: tuple[RunningServer, RunningServer]
    ) -> None:
        """B not following the feed keeps answering VALID for a key revoked through A."""
        a, b = unfollowing_replicas
        with a.client() as ca, b.client(a.admin_key) as cb:
            key_id, secret = _warm(ca, cb, SCOPES)
            ca.revoke_key(key_id, tenant_id="acme")
            assert _until(REVOKED, cb, secret, SCOPES, STALE_WATCH) is None

    def test_a_killed_listener_still_sees_changes_made_meanwhile(
        self, replicas: tuple[RunningServer, RunningServer], postgres_url: str
    ) -> None:
        """pg_terminate_backend on B's LISTEN connection: the revocation still reaches B."""
        a, b = replicas
        admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        try:
            with a.client() as ca, b.client(a.admin_key) as cb:
                for _ in range(10):
                    key_id, secret = _warm(ca, cb, SCOPES)
                    assert _terminate_listeners(admin) >= 1
                    ca.revoke_key(key_id, tenant_id="acme")
                    assert _until(REVOKED, cb, secret, SCOPES, PROPAGATION_BOUND) is not None
        finally:
            admin.dispose()

    def test_answers_say_which_feed_position_they_reflect(
        self, replicas: tuple[RunningServer, RunningServer]
    ) -> None:
        """feed_position moves with changes; B's answer after seeing a revocation reflects it."""
        a, b = replicas
        with a.client() as ca, b.client(a.admin_key) as cb:
            key_id, secret = _warm(ca, cb, SCOPES)
            before = cb.verify(secret, SCOPES, tenant_id="acme").feed_position
            ca.revoke_key(key_id, tenant_id="acme")
            head = SqlChangeFeed(a.app.services.database).head()
            assert _until(REVOKED, cb, secret, SCOPES, PROPAGATION_BOUND) is not None
            after = cb.verify(secret, SCOPES, tenant_id="acme").feed_position
        assert before < head <= after


class TestWatch:
    def test_stream_sends_changes_in_order_without_secrets(self, server: RunningServer) -> None:
        """A watcher sees each change with its kind, in position order, never a secret."""
        with server.client() as client:
            stream = client.watch_key_changes(tenant_id="acme", timeout=10)
            first = next(stream)  # the stream is open from here
            created = client.create_key("svc", SCOPES, tenant_id="acme")
            client.revoke_key(created.key.id, tenant_id="acme")
            got: list[tuple[str, int]] = []
            raw = b""
            for message in stream:
                raw += message.SerializeToString()
                got += [(c.key_id, c.kind) for c in message.changes]
                if len(got) >= 2:
                    break
            stream.close()
        assert got == [
            (created.key.id, api_key_pb2.EVENT_ACTION_CREATED),
            (created.key.id, api_key_pb2.EVENT_ACTION_REVOKED),
        ]
        assert created.secret.encode() not in raw
        assert first.position >= 0

    def test_heartbeats_arrive_at_least_every_second(self, server: RunningServer) -> None:
        """With nothing changing, the stream still speaks: three messages within three seconds."""
        with server.client() as client:
            started = time.monotonic()
            stream = client.watch_key_changes(tenant_id="acme", timeout=10)
            messages = [next(stream) for _ in range(3)]
            elapsed = time.monotonic() - started
            stream.close()
        assert all(not m.changes for m in messages)
        assert elapsed < 3.0
        assert all(m.HasField("confirm_time") for m in messages)

    def test_resume_from_a_position_replays_what_came_after(self, server: RunningServer) -> None:
        """after_position = a position seen earlier: the changes after it, even from before the
        server started (read from the database)."""
        feed = _feed(server)
        start = feed.head()
        with server.client() as client:
            one = client.create_key("one", SCOPES, tenant_id="acme").key
            two = client.create_key("two", SCOPES, tenant_id="acme").key
            first = feed.read_changes(start, 10).changes[0].position
            for after, expected in ((start, [one.id, two.id]), (first, [two.id])):
                stream = client.watch_key_changes(after, tenant_id="acme", timeout=10)
                got = [c.key_id for c in next(stream).changes]
                stream.close()
                assert got == expected

    def test_backlog_older_than_this_process_is_read_from_the_database(
        self, database_url: str
    ) -> None:
        """A position from before this server started is served from the feed table."""
        settings = server_settings(database_url)
        with running_server(settings) as first, first.client() as client:
            start = _feed(first).head()
            made = client.create_key("before", SCOPES, tenant_id="acme").key
            admin = first.admin_key
        with running_server(settings) as second, second.client(admin) as client:
            stream = client.watch_key_changes(start, tenant_id="acme", timeout=10)
            got = [c.key_id for c in next(stream).changes]
            stream.close()
        assert got == [made.id]

    def test_a_tenant_sees_only_its_own_changes(self, server: RunningServer) -> None:
        """A tenant key's stream carries its tenant's changes; a platform key may watch all."""
        with server.client() as client:
            tenant_key = client.create_key("gw", ["apikeys:verify"], tenant_id="acme").secret
            start = _feed(server).head()
            ours = client.create_key("ours", SCOPES, tenant_id="acme").key
            theirs = client.create_key("theirs", SCOPES, tenant_id="globex").key
            every = client.watch_key_changes(start, timeout=10)
            assert [c.key_id for c in next(every).changes] == [ours.id, theirs.id]
            every.close()
        with server.client(tenant_key) as gateway:
            own = gateway.watch_key_changes(start, timeout=10)
            assert [c.key_id for c in next(own).changes] == [ours.id]
            own.close()
            with pytest.raises(PermissionDenied):
                next(gateway.watch_key_changes(start, tenant_id="globex", timeout=10))

    @pytest.mark.parametrize(
        ("api_key", "code"),
        [
            ("", grpc.StatusCode.UNAUTHENTICATED),
            ("no-verify-scope", grpc.StatusCode.PERMISSION_DENIED),
        ],
    )
    def test_callers_need_a_key_with_verify(
        self, server: RunningServer, api_key: str, code: grpc.StatusCode
    ) -> None:
        """No key: UNAUTHENTICATED; a key without apikeys:verify: PERMISSION_DENIED."""
        if api_key:
            with server.client() as client:
                api_key = client.create_key("reader", ["apikeys:read"], tenant_id="acme").secret
        with server.channel() as channel:
            _, verifier = server.stubs(channel)
            metadata = (("x-api-key", api_key),) if api_key else ()
            stream = verifier.WatchKeyChanges(
                key_verifier_pb2.WatchKeyChangesRequest(tenant_id="acme"),
                metadata=metadata,
                timeout=5,
            )
            with pytest.raises(grpc.RpcError) as raised:
                next(stream)
        assert raised.value.code() == code

    def test_positions_out_of_the_feed_are_refused(
        self, server: RunningServer, clock: FakeClock
    ) -> None:
        """Beyond the head or negative: INVALID_ARGUMENT; pruned: FAILED_PRECONDITION."""
        feed = _feed(server)
        with server.client() as client:
            client.create_key("svc", SCOPES, tenant_id="acme")
            head = feed.head()
            for position in (head + 1000, -1):
                with pytest.raises(InvalidArgument):
                    next(client.watch_key_changes(position, tenant_id="acme", timeout=5))
            clock.advance(timedelta(days=8))
            client.create_key("later", SCOPES, tenant_id="acme")
            feed.prune(clock.now() - timedelta(days=7))
            settle(server)
            with pytest.raises(FailedPrecondition) as raised:
                next(client.watch_key_changes(1, tenant_id="acme", timeout=5))
        assert "pruned" in str(raised.value)
