"""KeyVerifier.Verify end to end over a real server: every code, and the cache never lies."""

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from apikeys.v1 import key_verifier_pb2
from apikeys_server.domain.key_format import KeyFormat, digest
from apikeys_server.storage.cache import MISS
from tests.support import FakeClock, RunningServer, running_server, server_settings

TENANT = "acme"
VALID = key_verifier_pb2.VERIFY_CODE_VALID
MISSING = key_verifier_pb2.VERIFY_CODE_MISSING
MALFORMED = key_verifier_pb2.VERIFY_CODE_MALFORMED
NOT_FOUND = key_verifier_pb2.VERIFY_CODE_NOT_FOUND
REVOKED = key_verifier_pb2.VERIFY_CODE_REVOKED
EXPIRED = key_verifier_pb2.VERIFY_CODE_EXPIRED
INSUFFICIENT_SCOPE = key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE


@pytest.fixture
def cached_server(database_url: str, clock: FakeClock) -> Iterator[RunningServer]:
    """A server whose cache entries outlive the test: only eviction can make them go."""
    settings = server_settings(
        database_url, cache_ttl_seconds=3600.0, negative_cache_ttl_seconds=3600.0
    )
    with running_server(settings, clock) as running:
        yield running


def _flip_last(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


class _VerifyRace:
    """Threads verifying one key in a loop while the test revokes it.

    Entering starts the threads and waits until each has had an answer; ``mark_revoked``
    records the instant RevokeKey returned; leaving waits until each thread has had an
    answer to a call begun after that instant, then stops them.
    """

    def __init__(self, server: RunningServer, secret: str, threads: int) -> None:
        self._server = server
        self._secret = secret
        self._lock = threading.Lock()
        self._answers: list[tuple[float, int]] = []
        self._revoked_at: float | None = None
        self._stop = threading.Event()
        self._signals = [(threading.Event(), threading.Event()) for _ in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=pair) for pair in self._signals]

    def __enter__(self) -> "_VerifyRace":
        for thread in self._threads:
            thread.start()
        for answered, _ in self._signals:
            assert answered.wait(timeout=30)
        return self

    def mark_revoked(self) -> None:
        with self._lock:
            self._revoked_at = time.monotonic()

    def __exit__(self, *exc_info: object) -> None:
        try:
            for _, answered_after in self._signals:
                assert answered_after.wait(timeout=30)
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=30)

    def codes_before(self) -> list[int]:
        assert self._revoked_at is not None
        return [code for begun, code in self._answers if begun <= self._revoked_at]

    def codes_after(self) -> list[int]:
        assert self._revoked_at is not None
        return [code for begun, code in self._answers if begun > self._revoked_at]

    def _run(self, answered: threading.Event, answered_after: threading.Event) -> None:
        with self._server.client() as client:
            while not self._stop.is_set():
                begun = time.monotonic()
                code = client.verify(self._secret, tenant_id=TENANT).code
                with self._lock:
                    self._answers.append((begun, code))
                    after = self._revoked_at is not None and begun > self._revoked_at
                answered.set()
                if after:
                    answered_after.set()


class TestVerifyCodes:
    def test_valid_key_answers_200_with_its_details(self, server: RunningServer) -> None:
        """A valid key with every required scope: VALID, 200, and the key's id, name, scopes."""
        expire = server.clock.now() + timedelta(days=1)
        with server.client() as client:
            created = client.create_key(
                "crm-sync-prod",
                ["passes:write", "passes:read"],
                tenant_id=TENANT,
                expire_time=expire,
            )
            answer = client.verify(created.secret, ["passes:read"], tenant_id=TENANT)
        assert answer.valid
        assert answer.code == VALID
        assert answer.http_status == 200
        assert answer.key_id == created.key.id
        assert answer.tenant_id == TENANT
        assert answer.name == "crm-sync-prod"
        assert list(answer.scopes) == ["passes:read", "passes:write"]
        assert list(answer.missing_scopes) == []
        assert answer.expire_time == created.key.expire_time

    def test_no_required_scopes_only_checks_the_key(self, server: RunningServer) -> None:
        """No required scopes: any valid key of the tenant is VALID (no expiry: no expire_time)."""
        with server.client() as client:
            created = client.create_key("svc", ["customers:read"], tenant_id=TENANT)
            answer = client.verify(created.secret, tenant_id=TENANT)
        assert answer.code == VALID
        assert not answer.HasField("expire_time")

    def test_empty_key_is_missing(self, server: RunningServer) -> None:
        """An empty key: MISSING, 401, no key details."""
        with server.client() as client:
            answer = client.verify("", ["passes:read"], tenant_id=TENANT)
        assert (answer.valid, answer.code, answer.http_status) == (False, MISSING, 401)
        assert answer.key_id == ""

    @pytest.mark.parametrize(
        "mangle",
        [
            pytest.param(_flip_last, id="bad-checksum"),
            pytest.param(lambda k: k[:-1], id="truncated"),
            pytest.param(lambda k: k + "0", id="too-long"),
            pytest.param(lambda k: "xk" + k[2:], id="other-prefix"),
            pytest.param(lambda k: k.upper(), id="upper-cased"),
            pytest.param(lambda k: " " + k, id="leading-space"),
            pytest.param(lambda k: k + "\n", id="trailing-newline"),
        ],
    )
    def test_mangled_key_is_malformed_without_touching_the_cache(
        self, server: RunningServer, mangle
    ) -> None:
        """A key with a typo or the wrong shape: MALFORMED, 401, and no cache entry is added."""
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
            before = server.app.services.cache.sizes()
            answer = client.verify(mangle(created.secret), ["passes:read"], tenant_id=TENANT)
        assert (answer.valid, answer.code, answer.http_status) == (False, MALFORMED, 401)
        assert answer.key_id == ""
        assert server.app.services.cache.sizes() == before

    def test_unknown_key_is_not_found(self, server: RunningServer) -> None:
        """A well-formed key that was never issued: NOT_FOUND, 401."""
        with server.client() as client:
            answer = client.verify(KeyFormat("ak").generate(), tenant_id=TENANT)
        assert (answer.valid, answer.code, answer.http_status) == (False, NOT_FOUND, 401)
        assert answer.key_id == ""

    def test_key_of_another_tenant_is_not_found_and_leaks_nothing(
        self, server: RunningServer
    ) -> None:
        """A valid key of another tenant answers exactly what an unknown key answers."""
        with server.client() as client:
            theirs = client.create_key("svc", ["passes:read"], tenant_id="globex")
            other = client.verify(theirs.secret, ["passes:read"], tenant_id=TENANT)
            unknown = client.verify(KeyFormat("ak").generate(), ["passes:read"], tenant_id=TENANT)
            own = client.verify(theirs.secret, ["passes:read"], tenant_id="globex")
        assert other.code == NOT_FOUND
        # The feed position is global (it may move between the calls), never about one key.
        other.ClearField("feed_position")
        unknown.ClearField("feed_position")
        assert other.SerializeToString() == unknown.SerializeToString()
        assert own.code == VALID

    def test_revoked_key_is_revoked(self, server: RunningServer) -> None:
        """A revoked key: REVOKED, 401, with its id so the caller can log which key."""
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
            client.revoke_key(created.key.id, tenant_id=TENANT)
            answer = client.verify(created.secret, ["passes:read"], tenant_id=TENANT)
        assert (answer.valid, answer.code, answer.http_status) == (False, REVOKED, 401)
        assert answer.key_id == created.key.id

    def test_key_expires_at_its_expire_time(self, server: RunningServer) -> None:
        """VALID until expire_time, EXPIRED (401) from that instant on."""
        expire = server.clock.now() + timedelta(hours=1)
        with server.client() as client:
            created = client.create_key(
                "svc", ["passes:read"], tenant_id=TENANT, expire_time=expire
            )
            server.clock.advance(timedelta(minutes=59, seconds=59))
            before = client.verify(created.secret, ["passes:read"], tenant_id=TENANT)
            server.clock.advance(timedelta(seconds=1))
            at = client.verify(created.secret, ["passes:read"], tenant_id=TENANT)
        assert before.code == VALID
        assert (at.valid, at.code, at.http_status) == (False, EXPIRED, 401)
        assert at.key_id == created.key.id

    def test_missing_scopes_answer_403(self, server: RunningServer) -> None:
        """A valid key lacking required scopes: INSUFFICIENT_SCOPE, 403, the missing ones listed."""
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
            answer = client.verify(
                created.secret,
                ["passes:write", "passes:read", "customers:write"],
                tenant_id=TENANT,
            )
        assert (answer.valid, answer.code, answer.http_status) == (
            False,
            INSUFFICIENT_SCOPE,
            403,
        )
        assert list(answer.missing_scopes) == ["customers:write", "passes:write"]
        assert answer.key_id == created.key.id
        assert list(answer.scopes) == ["passes:read"]

    def test_revoked_wins_over_expired_and_scopes(self, server: RunningServer) -> None:
        """A revoked, expired key lacking scopes answers REVOKED: the most final reason."""
        with server.client() as client:
            created = client.create_key(
                "svc",
                ["passes:read"],
                tenant_id=TENANT,
                expire_time=server.clock.now() + timedelta(minutes=1),
            )
            client.revoke_key(created.key.id, tenant_id=TENANT)
            server.clock.advance(timedelta(hours=1))
            answer = client.verify(created.secret, ["customers:write"], tenant_id=TENANT)
        assert answer.code == REVOKED


class TestRevocationIsSeenAtOnce:
    def test_no_stale_answer_after_revoke(self, cached_server: RunningServer) -> None:
        """Over many create/verify/revoke rounds with a warm cache, the next Verify says REVOKED."""
        cache = cached_server.app.services.cache
        stale = []
        with cached_server.client() as client:
            for round_ in range(30):
                created = client.create_key(f"svc-{round_}", ["passes:read"], tenant_id=TENANT)
                for _ in range(2):
                    warm = client.verify(created.secret, ["passes:read"], tenant_id=TENANT)
                    assert warm.code == VALID
                assert cache.get(digest(created.secret)) is not MISS  # cached before revoking
                client.revoke_key(created.key.id, tenant_id=TENANT)
                after = client.verify(created.secret, ["passes:read"], tenant_id=TENANT)
                if after.code != REVOKED:
                    stale.append((round_, after.code))
        assert stale == []

    def test_no_stale_answer_under_concurrent_verifies(self, cached_server: RunningServer) -> None:
        """With Verify calls racing RevokeKey, every call begun after it returned says REVOKED."""
        stale: list[int] = []
        with cached_server.client() as client:
            for round_ in range(8):
                created = client.create_key(f"svc-{round_}", ["passes:read"], tenant_id=TENANT)
                race = _VerifyRace(cached_server, created.secret, threads=4)
                with race:
                    client.revoke_key(created.key.id, tenant_id=TENANT)
                    race.mark_revoked()
                assert VALID in race.codes_before()
                after = race.codes_after()
                assert after
                stale.extend(code for code in after if code != REVOKED)
        assert stale == []

    def test_revoke_evicts_the_cached_record(self, cached_server: RunningServer) -> None:
        """After RevokeKey returns, the key's positive cache entry is gone."""
        cache = cached_server.app.services.cache
        with cached_server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
            client.verify(created.secret, tenant_id=TENANT)
            cached = cache.get(digest(created.secret))
            assert cached is not MISS
            assert cached is not None
            client.revoke_key(created.key.id, tenant_id=TENANT)
        assert cache.get(digest(created.secret)) is MISS


class TestNegativeCache:
    def test_unknown_keys_are_cached_as_absent(self, cached_server: RunningServer) -> None:
        """A NOT_FOUND answer is cached, and answered again from the cache as NOT_FOUND."""
        unknown = KeyFormat("ak").generate()
        cache = cached_server.app.services.cache
        with cached_server.client() as client:
            first = client.verify(unknown, tenant_id=TENANT)
            assert cache.get(digest(unknown)) is None  # a negative entry, not a miss
            second = client.verify(unknown, tenant_id=TENANT)
        assert first.code == second.code == NOT_FOUND

    def test_key_created_after_a_not_found_is_not_hidden(
        self, cached_server: RunningServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """CreateKey evicts a negative entry for its digest: the new key verifies at once."""
        chosen = KeyFormat("ak").generate()
        cache = cached_server.app.services.cache
        with cached_server.client() as client:
            assert client.verify(chosen, tenant_id=TENANT).code == NOT_FOUND
            negatives_before = cache.sizes()[1]
            assert cache.get(digest(chosen)) is None
            # Secrets are random; make the server's next one the string just verified.
            monkeypatch.setattr(KeyFormat, "generate", lambda self: chosen)
            created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
            monkeypatch.undo()
            assert created.secret == chosen
            assert cache.sizes()[1] == negatives_before - 1
            assert cache.get(digest(chosen)) is MISS
            answer = client.verify(chosen, ["passes:read"], tenant_id=TENANT)
        assert answer.code == VALID
        assert answer.key_id == created.key.id

    def test_flood_of_unknown_keys_does_not_push_out_valid_ones(
        self, database_url: str, clock: FakeClock
    ) -> None:
        """Negative entries live apart from positive ones: unknown keys never evict a valid one."""
        settings = server_settings(
            database_url,
            cache_size=4,
            cache_ttl_seconds=3600.0,
            negative_cache_size=4,
            negative_cache_ttl_seconds=3600.0,
        )
        key_format = KeyFormat("ak")
        with running_server(settings, clock) as server, server.client() as client:
            cache = server.app.services.cache
            created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
            client.verify(created.secret, tenant_id=TENANT)
            for _ in range(50):
                assert client.verify(key_format.generate(), tenant_id=TENANT).code == NOT_FOUND
            assert cache.get(digest(created.secret)) is not MISS
            assert cache.sizes() == (2, 4)  # the caller's key and the valid one; 4 negatives


class TestEnvironmentPrefix:
    def test_keys_of_another_environment_are_malformed(
        self, database_url: str, clock: FakeClock
    ) -> None:
        """A real wc_test key, in the same database, is MALFORMED on a wc_live server."""
        test_env = running_server(server_settings(database_url, key_prefix="wc_test"), clock)
        live_env = running_server(server_settings(database_url, key_prefix="wc_live"), clock)
        with test_env as test_server, live_env as live_server:
            with test_server.client() as client:
                created = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
                assert created.secret.startswith("wc_test_")
                assert client.verify(created.secret, tenant_id=TENANT).code == VALID
            with live_server.client() as client:
                own = client.create_key("svc", ["passes:read"], tenant_id=TENANT)
                assert own.secret.startswith("wc_live_")
                assert client.verify(own.secret, tenant_id=TENANT).code == VALID
                other_env = client.verify(created.secret, tenant_id=TENANT)
                default_env = client.verify(KeyFormat("ak").generate(), tenant_id=TENANT)
        assert (other_env.code, other_env.http_status) == (MALFORMED, 401)
        assert default_env.code == MALFORMED
