"""The Verify cache: positive and negative entries, bounds, TTL, eviction and its race guard."""

import math
import threading
from dataclasses import replace
from datetime import UTC, datetime

from apikeys_server.domain.records import VerifyRecord
from apikeys_server.storage.cache import MISS, CachedKeyLookup, KeyCache


def record(n: int) -> VerifyRecord:
    return VerifyRecord(
        id=f"key_{n}",
        tenant_id="acme",
        name="crm-sync-prod",
        scopes=frozenset({"passes:read"}),
        digest=digest_of(n),
    )


def digest_of(n: int) -> bytes:
    return n.to_bytes(32, "big")


class FakeTimer:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cache(
    maxsize: int = 10,
    ttl: float = 1.0,
    negative_maxsize: int = 10,
    negative_ttl: float = 30.0,
    timer: FakeTimer | None = None,
) -> KeyCache:
    return KeyCache(maxsize, ttl, negative_maxsize, negative_ttl, timer or FakeTimer())


def put(cache: KeyCache, n: int, value: VerifyRecord | None) -> None:
    cache.put(digest_of(n), value, cache.generation)


class CountingSource:
    """A fake KeyLookup port over a dict that counts lookups."""

    def __init__(self, *records: VerifyRecord) -> None:
        self.records = {r.digest: r for r in records}
        self.calls = 0

    def find_by_digest(self, digest: bytes) -> VerifyRecord | None:
        self.calls += 1
        return self.records.get(digest)


class TestKeyCache:
    def test_miss_then_hit(self) -> None:
        """An absent digest is MISS; after put it returns the stored record."""
        cache = make_cache()
        assert cache.get(digest_of(1)) is MISS
        put(cache, 1, record(1))
        assert cache.get(digest_of(1)) == record(1)

    def test_stored_copy_keeps_every_field(self) -> None:
        """The cache stores a copy stamped with its expiry: equal in every field of the key."""
        timer = FakeTimer()
        cache = make_cache(ttl=5.0, timer=timer)
        full = replace(
            record(1),
            scopes=frozenset({"passes:read", "passes:write"}),
            expire_time=datetime(2030, 1, 1, tzinfo=UTC),
            revoked=True,
        )
        put(cache, 1, full)
        stored = cache.get(digest_of(1))
        assert isinstance(stored, VerifyRecord)
        assert stored == full
        assert (full.cached_until, stored.cached_until) == (math.inf, timer.now + 5.0)

    def test_negative_entry(self) -> None:
        """A stored 'no such key' answers None, distinct from MISS."""
        cache = make_cache()
        put(cache, 1, None)
        assert cache.get(digest_of(1)) is None
        assert cache.sizes() == (0, 1)

    def test_positive_ttl_expiry(self) -> None:
        """A positive entry is served until its TTL passes, then is a MISS."""
        timer = FakeTimer()
        cache = make_cache(ttl=1.0, timer=timer)
        put(cache, 1, record(1))
        timer.now += 0.9
        assert cache.get(digest_of(1)) == record(1)
        timer.now += 0.2
        assert cache.get(digest_of(1)) is MISS

    def test_negative_ttl_is_separate(self) -> None:
        """Negative entries live for their own TTL, longer than positive ones here."""
        timer = FakeTimer()
        cache = make_cache(ttl=1.0, negative_ttl=30.0, timer=timer)
        put(cache, 1, record(1))
        put(cache, 2, None)
        timer.now += 5
        assert cache.get(digest_of(1)) is MISS
        assert cache.get(digest_of(2)) is None
        timer.now += 26
        assert cache.get(digest_of(2)) is MISS

    def test_maxsize_bound_respected_lru(self) -> None:
        """Positive entries never exceed maxsize; the least recently used goes first."""
        cache = make_cache(maxsize=3)
        for n in range(3):
            put(cache, n, record(n))
        assert cache.get(digest_of(0)) == record(0)
        put(cache, 3, record(3))
        assert cache.sizes()[0] == 3
        assert cache.get(digest_of(1)) is MISS
        assert cache.get(digest_of(0)) == record(0)
        for n in range(4, 50):
            put(cache, n, record(n))
        assert cache.sizes()[0] == 3

    def test_negative_flood_cannot_evict_positive_entries(self) -> None:
        """A flood of unknown keys fills only the negative cache; valid keys stay cached."""
        cache = make_cache(maxsize=2, negative_maxsize=5)
        put(cache, 1, record(1))
        put(cache, 2, record(2))
        for n in range(1000, 2000):
            put(cache, n, None)
        assert cache.sizes() == (2, 5)
        assert cache.get(digest_of(1)) == record(1)
        assert cache.get(digest_of(2)) == record(2)

    def test_evict_removes_both_kinds(self) -> None:
        """evict() forgets a digest whether cached as a record or as 'no such key'."""
        cache = make_cache()
        put(cache, 1, record(1))
        put(cache, 2, None)
        cache.evict(digest_of(1))
        cache.evict(digest_of(2))
        assert cache.get(digest_of(1)) is MISS
        assert cache.get(digest_of(2)) is MISS
        assert cache.sizes() == (0, 0)

    def test_evict_unknown_digest_is_harmless(self) -> None:
        """Evicting a digest that is not cached leaves other entries alone."""
        cache = make_cache()
        put(cache, 1, record(1))
        cache.evict(digest_of(99))
        assert cache.get(digest_of(1)) == record(1)

    def test_evict_bumps_generation_and_blocks_stale_put(self) -> None:
        """A put carrying a generation from before an eviction is dropped."""
        cache = make_cache()
        before = cache.generation
        cache.evict(digest_of(1))
        assert cache.generation == before + 1
        cache.put(digest_of(1), record(1), before)
        assert cache.get(digest_of(1)) is MISS
        cache.put(digest_of(1), None, before)
        assert cache.get(digest_of(1)) is MISS

    def test_clear_empties_and_blocks_stale_put(self) -> None:
        """clear() drops every entry and invalidates lookups in flight."""
        cache = make_cache()
        put(cache, 1, record(1))
        put(cache, 2, None)
        before = cache.generation
        cache.clear()
        assert cache.sizes() == (0, 0)
        cache.put(digest_of(3), record(3), before)
        assert cache.get(digest_of(3)) is MISS

    def test_size_zero_disables_caching(self) -> None:
        """maxsize 0 (or ttl 0) stores nothing: every get is a MISS."""
        for cache in (make_cache(maxsize=0, negative_maxsize=0), make_cache(ttl=0, negative_ttl=0)):
            put(cache, 1, record(1))
            put(cache, 2, None)
            assert cache.get(digest_of(1)) is MISS
            assert cache.get(digest_of(2)) is MISS
            assert cache.sizes() == (0, 0)
            cache.evict(digest_of(1))
            cache.clear()

    def test_negative_disabled_positive_enabled(self) -> None:
        """Disabling only the negative cache still caches records."""
        cache = make_cache(negative_maxsize=0)
        put(cache, 1, record(1))
        put(cache, 2, None)
        assert cache.get(digest_of(1)) == record(1)
        assert cache.get(digest_of(2)) is MISS

    def test_thread_safety_smoke(self) -> None:
        """Threads hammering get/put/evict raise nothing and the bounds hold."""
        cache = make_cache(maxsize=16, negative_maxsize=8)
        errors: list[BaseException] = []
        start = threading.Barrier(6)

        def hammer(seed: int) -> None:
            try:
                start.wait()
                for i in range(3000):
                    n = (seed * 7919 + i) % 64
                    action = i % 4
                    if action == 0:
                        cache.evict(digest_of(n))
                    elif action == 1:
                        put(cache, n, None)
                    elif action == 2:
                        put(cache, n, record(n))
                    else:
                        got = cache.get(digest_of(n))
                        assert got is MISS or got is None or got.id == f"key_{n}"
                    positive, negative = cache.sizes()
                    assert positive <= 16 and negative <= 8
            except BaseException as error:  # reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        positive, negative = cache.sizes()
        assert positive <= 16 and negative <= 8


class TestCachedKeyLookup:
    def test_hit_skips_source(self) -> None:
        """A second lookup of a known key is served from the cache."""
        source = CountingSource(record(1))
        lookup = CachedKeyLookup(source, make_cache())
        assert lookup.find_by_digest(digest_of(1)) == record(1)
        assert lookup.find_by_digest(digest_of(1)) == record(1)
        assert source.calls == 1

    def test_unknown_key_is_cached_negatively(self) -> None:
        """A second lookup of an unknown key is answered None from the negative cache."""
        source = CountingSource()
        cache = make_cache()
        lookup = CachedKeyLookup(source, cache)
        assert lookup.find_by_digest(digest_of(7)) is None
        assert lookup.find_by_digest(digest_of(7)) is None
        assert source.calls == 1
        assert cache.sizes() == (0, 1)

    def test_eviction_forces_fresh_lookup(self) -> None:
        """After evict() the next lookup goes to the source and sees the change."""
        source = CountingSource(record(1))
        cache = make_cache()
        lookup = CachedKeyLookup(source, cache)
        lookup.find_by_digest(digest_of(1))
        changed = replace(record(1), revoked=True)
        source.records[digest_of(1)] = changed
        cache.evict(digest_of(1))
        assert lookup.find_by_digest(digest_of(1)) == changed
        assert source.calls == 2

    def test_ttl_expiry_forces_fresh_lookup(self) -> None:
        """Once the TTL passes the source is asked again."""
        timer = FakeTimer()
        source = CountingSource(record(1))
        lookup = CachedKeyLookup(source, make_cache(ttl=1.0, timer=timer))
        lookup.find_by_digest(digest_of(1))
        timer.now += 2
        lookup.find_by_digest(digest_of(1))
        assert source.calls == 2

    def test_lookup_racing_an_eviction_does_not_cache_stale_answer(self) -> None:
        """A lookup that began before evict() returns its answer but never caches it."""
        cache = make_cache()
        stale = record(1)

        class EvictingSource:
            calls = 0

            def find_by_digest(self, digest: bytes) -> VerifyRecord | None:
                self.calls += 1
                cache.evict(digest)  # a revocation commits while this read is in flight
                return stale

        source = EvictingSource()
        lookup = CachedKeyLookup(source, cache)
        assert lookup.find_by_digest(digest_of(1)) is stale
        assert cache.get(digest_of(1)) is MISS
        lookup.find_by_digest(digest_of(1))
        assert source.calls == 2

    def test_negative_answer_racing_an_eviction_is_not_cached(self) -> None:
        """A 'no such key' read before a create commits is not cached as negative."""
        cache = make_cache()

        class EvictingSource:
            def find_by_digest(self, digest: bytes) -> VerifyRecord | None:
                cache.evict(digest)
                return None

        lookup = CachedKeyLookup(EvictingSource(), cache)
        assert lookup.find_by_digest(digest_of(1)) is None
        assert cache.get(digest_of(1)) is MISS

    def test_disabled_cache_always_asks_source(self) -> None:
        """With caching disabled every lookup reaches the source."""
        source = CountingSource(record(1))
        lookup = CachedKeyLookup(source, make_cache(maxsize=0, negative_maxsize=0))
        for _ in range(3):
            assert lookup.find_by_digest(digest_of(1)) == record(1)
            assert lookup.find_by_digest(digest_of(2)) is None
        assert source.calls == 6


def test_stats_count_hits_misses_and_evictions() -> None:
    """What the metrics read at scrape time (storage/cache.py KeyCache.stats)."""
    from apikeys_server.storage.cache import KeyCache as Cache

    cache = Cache(1, 60.0, 10, 60.0)
    assert cache.get(b"a") is not None  # MISS
    cache.put(b"a", None, cache.generation)
    assert cache.get(b"a") is None  # a negative hit
    stats = cache.stats()
    assert (stats.misses, stats.negative_hits, stats.hits, stats.negative_size) == (1, 1, 0, 1)
    cache.evict(b"a")
    assert cache.stats().evictions == 1
    assert cache.stats().negative_size == 0


class TestCachedAlone:
    def test_cached_counts_hits_not_misses(self) -> None:
        """``cached`` answers hits and negative hits (counted) and MISS without counting it."""
        cache = make_cache()
        put(cache, 1, record(1))
        put(cache, 2, None)
        assert cache.cached(digest_of(1)) == record(1)
        assert cache.cached(digest_of(2)) is None
        assert cache.cached(digest_of(3)) is MISS
        stats = cache.stats()
        assert (stats.hits, stats.negative_hits, stats.misses) == (1, 1, 0)
        assert cache.get(digest_of(3)) is MISS
        assert cache.stats().misses == 1

    def test_cached_honours_trust_and_expiry(self) -> None:
        """Past the trust deadline or the entry's TTL, ``cached`` is a MISS like ``get``."""
        timer = FakeTimer()
        cache = make_cache(timer=timer)
        put(cache, 1, record(1))
        cache.trust_until(timer.now - 1)
        assert cache.cached(digest_of(1)) is MISS
        cache.trust_until(math.inf)
        timer.now += 2  # past the 1 s TTL
        assert cache.cached(digest_of(1)) is MISS

    def test_lookup_shares_the_cached_read(self) -> None:
        """CachedKeyLookup.cached is the cache's own: the Verifier asks it before a shape check."""
        cache = make_cache()
        lookup = CachedKeyLookup(CountingSource(record(1)), cache)
        assert lookup.cached(digest_of(1)) is MISS
        lookup.find_by_digest(digest_of(1))
        assert lookup.cached(digest_of(1)) == record(1)


class TestLruRead:
    def _least_recent_is_dropped(self) -> None:
        cache = make_cache(maxsize=2)
        put(cache, 1, record(1))
        put(cache, 2, record(2))
        assert cache.get(digest_of(1)) == record(1)  # 1 is now the most recently used
        put(cache, 3, record(3))
        assert cache.get(digest_of(2)) is MISS
        assert cache.get(digest_of(1)) == record(1)
        assert cache.get(digest_of(3)) == record(3)

    def test_read_marks_as_used(self) -> None:
        """A read through cachetools' own dict and order moves the entry to the end (LRU)."""
        self._least_recent_is_dropped()

    def test_public_read_when_cachetools_differs(self, monkeypatch) -> None:
        """Without cachetools' private members, the public get is used, with the same LRU order."""
        from apikeys_server.storage import cache as module

        monkeypatch.setattr(module, "_internals", lambda entries: None)
        self._least_recent_is_dropped()

    def test_cachetools_internals_are_found(self) -> None:
        """The installed cachetools has the members the cheap read uses (else it falls back)."""
        from apikeys_server.storage import cache as module

        assert module._internals(module._CountingLru(2)) is not None
