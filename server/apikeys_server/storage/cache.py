"""The Verify cache: bounded LRU with TTL, positive and negative entries, safe under threads.

Positive entries (a record) and negative ones (no such key) live in separate bounded caches,
so a flood of unknown keys can never push valid keys out. Entries are immutable records.

Invalidation is one call, ``evict(digest)``: this process calls it after each change it
commits, and the change-feed follower calls it for every change any process commits. A
generation counter closes the race where a lookup that started before a change stores its
stale answer after the eviction: such an answer is returned to its caller but never cached.
"""

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from cachetools import LRUCache

from apikeys_server.domain.ports import KeyLookup
from apikeys_server.domain.records import VerifyRecord


class _Miss:
    pass


MISS: Final = _Miss()
V = TypeVar("V")


class _CountingLru(LRUCache[bytes, V]):
    """An LRUCache that counts the entries it drops to make room (read by the metrics)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.dropped = 0

    def popitem(self) -> tuple[bytes, V]:
        self.dropped += 1
        return super().popitem()


class _TtlLru(Generic[V]):
    """A ``cachetools.LRUCache`` whose entries also expire ``ttl`` seconds after being stored.

    cachetools' own TTLCache costs ~1 µs a read (it sweeps and relinks on every access); an
    LRUCache checked on read costs ~0.2 µs, and there are two reads per Verify (the caller's
    key and the verified one). An expired entry is dropped when read; one never read again
    ages out through the LRU bound. Each entry carries its own expiry (see the subclasses),
    not a ``(value, expires)`` pair: a tuple is 56 bytes per cached key. Not locked: KeyCache
    holds its lock.
    """

    __slots__ = ("_entries", "_timer", "_ttl")

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float]) -> None:
        self._entries: _CountingLru[V] = _CountingLru(maxsize)
        self._ttl = ttl
        self._timer = timer

    @staticmethod
    def _expires(entry: V) -> float:
        raise NotImplementedError

    def pop(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def stored(self) -> tuple[int, int]:
        """(entries held, expired ones included; entries dropped to make room): O(1)."""
        return len(self._entries), self._entries.dropped

    def __len__(self) -> int:
        """Live entries only."""
        now = self._timer()
        return sum(1 for entry in self._entries.values() if now < self._expires(entry))


class _Records(_TtlLru[VerifyRecord]):
    """Positive entries: each record is stored as a copy carrying its expiry (cached_until)."""

    __slots__ = ()

    @staticmethod
    def _expires(entry: VerifyRecord) -> float:
        return entry.cached_until

    def get(self, key: bytes, now: float) -> VerifyRecord | _Miss:
        """The live record, marked as just used; MISS when absent or expired."""
        record = self._entries.get(key)
        if record is None:
            return MISS
        if now < record.cached_until:
            return record
        del self._entries[key]
        return MISS

    def put(self, key: bytes, record: VerifyRecord) -> None:
        self._entries[key] = record.cached(self._timer() + self._ttl)


class _Absences(_TtlLru[float]):
    """Negative entries: each is only its expiry time."""

    __slots__ = ()

    @staticmethod
    def _expires(entry: float) -> float:
        return entry

    def holds(self, key: bytes, now: float) -> bool:
        """Whether a live entry says there is no such key (marked as just used)."""
        expires = self._entries.get(key)
        if expires is None:
            return False
        if now < expires:
            return True
        del self._entries[key]
        return False

    def put(self, key: bytes) -> None:
        self._entries[key] = self._timer() + self._ttl


@dataclass(frozen=True)
class CacheStats:
    hits: int
    negative_hits: int
    misses: int
    evictions: int  # invalidations: changes evicted (evict), all entries of the digest
    positive_size: int
    negative_size: int
    positive_dropped: int  # capacity evictions (least recently used, to make room)
    negative_dropped: int


class KeyCache:
    """Both caches under one lock, trusted only while the change feed vouches for them.

    ``trust_until`` is moved forward by the feed follower each time it confirms it has applied
    every change; past it, every read is a miss and Verify goes to the database. Without a
    follower (``trust_until`` never called) entries are trusted for their TTL alone.
    """

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        negative_maxsize: int,
        negative_ttl: float,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._positive = _Records(maxsize, ttl, timer) if maxsize > 0 and ttl > 0 else None
        self._negative = (
            _Absences(negative_maxsize, negative_ttl, timer)
            if negative_maxsize > 0 and negative_ttl > 0
            else None
        )
        self._generation = 0
        self._timer = timer
        self._trusted_until = math.inf
        # Plain counts, under the lock already held: read by metrics.py at scrape time, so the
        # Verify path pays an integer add, not a metrics library call.
        self.hits = 0
        self.negative_hits = 0
        self.misses = 0
        self.evictions = 0

    def trust_until(self, deadline: float) -> None:
        """Entries may be served until ``deadline`` (on this cache's timer), no longer."""
        self._trusted_until = deadline

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, digest: bytes) -> VerifyRecord | _Miss | None:
        now = self._timer()
        with self._lock:
            if now <= self._trusted_until:
                if self._positive is not None:
                    record = self._positive.get(digest, now)
                    if record is not MISS:
                        self.hits += 1
                        return record
                if self._negative is not None and self._negative.holds(digest, now):
                    self.negative_hits += 1
                    return None
            self.misses += 1
        return MISS

    def put(self, digest: bytes, record: VerifyRecord | None, generation: int) -> None:
        """Stores a lookup's answer unless an eviction happened since the lookup began."""
        with self._lock:
            if generation != self._generation:
                return
            if record is not None:
                if self._positive is not None:
                    self._positive.put(digest, record)
            elif self._negative is not None:
                self._negative.put(digest)

    def evict(self, digest: bytes) -> None:
        with self._lock:
            self._generation += 1
            self.evictions += 1
            if self._positive is not None:
                self._positive.pop(digest)
            if self._negative is not None:
                self._negative.pop(digest)

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            if self._positive is not None:
                self._positive.clear()
            if self._negative is not None:
                self._negative.clear()

    def stats(self) -> "CacheStats":
        """Counts and sizes for the metrics, O(1) (sizes include expired entries not yet
        dropped): taken at scrape time, never on the Verify path."""
        with self._lock:
            positive = self._positive.stored() if self._positive is not None else (0, 0)
            negative = self._negative.stored() if self._negative is not None else (0, 0)
            return CacheStats(
                self.hits,
                self.negative_hits,
                self.misses,
                self.evictions,
                positive[0],
                negative[0],
                positive[1],
                negative[1],
            )

    def sizes(self) -> tuple[int, int]:
        """(positive, negative) entry counts."""
        with self._lock:
            return (
                len(self._positive) if self._positive is not None else 0,
                len(self._negative) if self._negative is not None else 0,
            )


class CachedKeyLookup:
    """A KeyLookup that answers from the cache and falls back to the store on a miss."""

    def __init__(self, source: KeyLookup, cache: KeyCache) -> None:
        self._source = source
        self._cache = cache

    def find_by_digest(self, digest: bytes) -> VerifyRecord | None:
        cached = self._cache.get(digest)
        if not isinstance(cached, _Miss):
            return cached
        generation = self._cache.generation
        record = self._source.find_by_digest(digest)
        self._cache.put(digest, record, generation)
        return record
