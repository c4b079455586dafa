"""CachingVerifier / AsyncCachingVerifier against a real server: answers as Verify gives them,
evicted by the change feed, never trusted past the staleness bound."""

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from apikeys.v1 import key_verifier_pb2
from apikeys_client import (
    ApiKeysClient,
    AsyncApiKeysClient,
    AsyncCachingVerifier,
    CachingVerifier,
    InvalidArgument,
)
from apikeys_client._caching import VerifyCache
from tests.support import RunningServer

VALID = key_verifier_pb2.VERIFY_CODE_VALID
REVOKED = key_verifier_pb2.VERIFY_CODE_REVOKED
INSUFFICIENT_SCOPE = key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
BOUND = 0.3  # seconds: the staleness bound of the bounded verifier below


def _count_verifies(server: RunningServer) -> list[int]:
    verifier = server.app.services.verifier
    count = [0]
    original = verifier.verify

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    verifier.verify = counting  # type: ignore[method-assign]
    return count


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _trusted(verifier: CachingVerifier) -> bool:
    return verifier.cache.trusted()


class TestCachingVerifier:
    def test_cached_answers_equal_the_servers(self, server: RunningServer, tenant: str) -> None:
        """VALID and INSUFFICIENT_SCOPE from the cache carry the fields Verify gives, without
        a call; refused answers always go to the server."""
        expire = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
        with server.client() as client, CachingVerifier(client) as verifier:
            created = client.create_key(
                "svc", ["passes:read", "customers:read"], tenant_id=tenant, expire_time=expire
            )
            _wait(lambda: _trusted(verifier))
            asks = [[], ["passes:read"], ["passes:write", "passes:read", "customers:read"]]
            direct = [client.verify(created.secret, ask, tenant_id=tenant) for ask in asks]
            for ask in asks:  # fills the cache, and teaches it the scopes asked
                verifier.verify(created.secret, ask, tenant_id=tenant)
            calls = _count_verifies(server)
            cached = [verifier.verify(created.secret, ask, tenant_id=tenant) for ask in asks]
            assert calls[0] == 0
            assert [c.code for c in cached] == [VALID, VALID, INSUFFICIENT_SCOPE]
            for mine, theirs in zip(cached, direct, strict=True):
                mine_copy, theirs_copy = type(mine)(), type(theirs)()
                mine_copy.CopyFrom(mine)
                theirs_copy.CopyFrom(theirs)
                mine_copy.feed_position = theirs_copy.feed_position = 0
                assert mine_copy == theirs_copy
            with pytest.raises(InvalidArgument):  # a scope the server never accepted: asked
                verifier.verify(created.secret, ["zz:read"], tenant_id=tenant)
            for _ in range(3):
                verifier.verify("not-a-key", tenant_id=tenant)
            assert calls[0] == 4
            assert all(slot[0] != created.secret.encode() for slot in verifier.cache._entries)

    def test_revocation_reaches_the_cache_quickly(self, server: RunningServer, tenant: str) -> None:
        """~30 trials: a cached VALID turns REVOKED soon after RevokeKey (loose bound here;
        BENCHMARKS.md has the 200-trial figure on PostgreSQL)."""
        delays = []
        with server.client() as client, CachingVerifier(client) as verifier:
            _wait(lambda: _trusted(verifier))
            for _ in range(30):
                created = client.create_key("svc", ["passes:read"], tenant_id=tenant)
                for _ in range(2):
                    answer = verifier.verify(created.secret, tenant_id=tenant)
                assert answer.code == VALID
                assert len(verifier.cache) >= 1
                start = time.monotonic()
                client.revoke_key(created.key.id, tenant_id=tenant)
                while verifier.verify(created.secret, tenant_id=tenant).code == VALID:
                    assert time.monotonic() - start < 3.0
                    time.sleep(0.001)
                delays.append(time.monotonic() - start)
        assert statistics.median(delays) < 0.5, delays
        assert max(delays) < 1.5, delays

    def test_stale_cache_is_not_trusted_past_the_bound(
        self, server: RunningServer, tenant: str
    ) -> None:
        """Stream stopped: within the bound the cache still answers (stale VALID: the negative
        control, with a large bound); past it every call goes to the server."""
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id=tenant)
            stale = CachingVerifier(client, max_staleness=3600)
            # Shorter than the server's 0.5 s heartbeat: trusted for 0.3 s after each message
            # while watching, which is all the test needs, and the wait past it stays short.
            bounded = CachingVerifier(client, max_staleness=BOUND)
            for verifier in (stale, bounded):
                _wait(lambda v=verifier: _trusted(v))  # type: ignore[misc]
                verifier.verify(created.secret, tenant_id=tenant)
                verifier.stop_watching()
            client.revoke_key(created.key.id, tenant_id=tenant)
            assert stale.verify(created.secret, tenant_id=tenant).code == VALID  # stale!
            time.sleep(BOUND + 0.1)
            assert bounded.verify(created.secret, tenant_id=tenant).code == REVOKED

    def test_pruned_position_clears_and_watches_from_now(self) -> None:
        """FAILED_PRECONDITION → reset: nothing kept, nothing stored until a stream's first
        message; an answer older than the applied position is not stored."""
        cache = VerifyCache()
        heartbeat = key_verifier_pb2.WatchKeyChangesResponse(position=10)
        answer = key_verifier_pb2.VerifyResponse(
            valid=True, code=VALID, http_status=200, key_id="key_a", feed_position=10
        )
        slot, _ = cache.lookup("secret", [], "")
        cache.store(slot, (), answer)
        assert len(cache) == 0  # not synced yet
        cache.apply(heartbeat)
        cache.store(slot, (), answer)
        assert cache.lookup("secret", [], "")[1] is not None
        cache.reset()
        assert len(cache) == 0 and not cache.trusted()
        cache.apply(key_verifier_pb2.WatchKeyChangesResponse(position=12))
        old = key_verifier_pb2.VerifyResponse()
        old.CopyFrom(answer)
        cache.store(slot, (), old)  # feed_position 10 < 12: may predate a change
        assert len(cache) == 0
        change = key_verifier_pb2.WatchKeyChangesResponse(position=13)
        change.changes.add(position=13, key_id="key_a")
        answer.feed_position = 12
        cache.store(slot, (), answer)
        assert len(cache) == 1
        cache.apply(change)
        assert len(cache) == 0


class TestAsyncCachingVerifier:
    def test_caches_and_evicts(self, server: RunningServer, tenant: str) -> None:
        async def run() -> None:
            async with (
                AsyncApiKeysClient(server.target, server.admin_key, timeout=10) as client,
                AsyncCachingVerifier(client) as verifier,
            ):
                created = await client.create_key("svc", ["passes:read"], tenant_id=tenant)
                while not verifier.cache.trusted():
                    await asyncio.sleep(0.01)
                await verifier.verify(created.secret, tenant_id=tenant)
                calls = _count_verifies(server)
                answer = await verifier.verify(created.secret, ["passes:read"], tenant_id=tenant)
                assert answer.code == VALID and calls[0] == 0
                await client.revoke_key(created.key.id, tenant_id=tenant)
                start = time.monotonic()
                while (await verifier.verify(created.secret, tenant_id=tenant)).code == VALID:
                    assert time.monotonic() - start < 3.0
                    await asyncio.sleep(0.005)

        asyncio.run(run())


def test_sync_client_is_accepted(server: RunningServer) -> None:
    with ApiKeysClient(server.target, server.admin_key) as client:
        CachingVerifier(client, watch=False).close()
