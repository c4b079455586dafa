"""The Verify cache: bounded LRU with TTL, positive and negative entries, safe under threads.

Positive entries (a record) and negative ones (no such key) live in separate bounded caches,
so a flood of unknown keys can never push valid keys out. Entries are immutable records.

Invalidation is one call, ``evict(digest)``: this process calls it after each change it
commits, and the change-feed follower calls it for every change any process commits. A
generation counter closes the race where a lookup that started before a change stores its
stale answer after the eviction: such an answer is returned to its caller but never cached.
"""

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import LRUCache

from apikeys_server.domain.ports import MISS, KeyLookup, Uncached
from apikeys_server.domain.records import VerifyRecord

__all__ = ["MISS", "CacheStats", "CachedKeyLookup", "KeyCache"]

V = TypeVar("V")


def _internals(
    cache: LRUCache[bytes, V],
) -> tuple[Callable[[bytes], V | None], Callable[[bytes], None]] | None:
    """The ``get`` of an LRUCache's own dict and the ``move_to_end`` of its own order (its
    private members, names mangled, as in cachetools 5 to 8); None when a version has other ones."""
    data = getattr(cache, "_Cache__data", None)
    order = getattr(cache, "_LRUCache__order", None)
    if isinstance(data, dict) and isinstance(order, collections.OrderedDict):
        return data.get, order.move_to_end
    return None


class _CountingLru(LRUCache[bytes, V]):
    """An LRUCache that counts the entries it drops to make room (read by the metrics)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.dropped = 0

    def popitem(self) -> tuple[bytes, V]:
        self.dropped += 1
        return super().popitem()


def _untouched(key: bytes) -> None:
    """The public get has marked the entry as used already."""


class _TtlLru(Generic[V]):
    """A ``cachetools.LRUCache`` whose entries also expire ``ttl`` seconds after being stored.

    cachetools' own TTLCache costs ~1 µs a read (it sweeps and relinks on every access); an
    LRUCache checked on read costs ~0.2 µs, and there are two reads per Verify (the caller's
    key and the verified one). An expired entry is dropped when read; one never read again
    ages out through the LRU bound. Each entry carries its own expiry (see the subclasses),
    not a ``(value, expires)`` pair: a tuple is 56 bytes per cached key. Not locked: KeyCache
    holds its lock.
    """

    __slots__ = ("_entries", "_timer", "_ttl", "read", "touch")

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float]) -> None:
        self._entries: _CountingLru[V] = _CountingLru(maxsize)
        self._ttl = ttl
        self._timer = timer
        # A read is what LRUCache.__getitem__ does, a read of its dict and a move_to_end of
        # its order, without the five Python calls of LRUCache.get (~0.3 µs of a ~0.5 µs
        # cached read, twice a Verify). Without those members: the public get, which marks
        # the entry as used itself. Values are never None.
        found = _internals(self._entries)
        self.read: Callable[[bytes], V | None]
        self.touch: Callable[[bytes], None]
        self.read, self.touch = found if found is not None else (self._entries.get, _untouched)

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
        expires = self.read(key)
        if expires is None:
            return False
        if now < expires:
            self.touch(key)
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

    def get(self, digest: bytes) -> VerifyRecord | Uncached | None:
        found = self.cached(digest)
        if found is MISS:
            self.missed()
        return found

    def missed(self) -> None:
        """Counts a lookup the cache could not answer (``cached`` leaves that to its caller)."""
        with self._lock:
            self.misses += 1

    def cached(self, digest: bytes) -> VerifyRecord | Uncached | None:
        """``get`` without counting a miss (a hit counts): for a caller that has yet to decide
        whether the key deserves a lookup (``get`` counts the miss when it does)."""
        now = self._timer()
        # acquire/release rather than ``with``: half the cost, twice a Verify.
        self._lock.acquire()
        try:
            if now <= self._trusted_until:
                positive = self._positive
                if positive is not None:
                    # _Records.get, spelled out: one Python call less on every Verify's two reads.
                    record = positive.read(digest)
                    if record is not None:
                        if now < record.cached_until:
                            positive.touch(digest)
                            self.hits += 1
                            return record
                        positive.pop(digest)
                if self._negative is not None and self._negative.holds(digest, now):
                    self.negative_hits += 1
                    return None
        finally:
            self._lock.release()
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
    """A KeyLookup that answers from the cache and falls back to the store on a miss. The
    Verifier asks the two halves apart: ``cached``, the cache alone, before it checks a key's
    shape; ``load``, the store, once the key is worth a lookup — so a miss reads the cache once."""

    def __init__(self, source: KeyLookup, cache: KeyCache) -> None:
        self._source = source
        self._cache = cache
        self.cached = cache.cached

    def find_by_digest(self, digest: bytes) -> VerifyRecord | None:
        cached = self._cache.cached(digest)
        if cached is not MISS:
            return cached
        return self.load(digest)

    def load(self, digest: bytes) -> VerifyRecord | None:
        """The store's answer for a digest the cache did not hold, cached unless a change
        came meanwhile (the generation)."""
        self._cache.missed()
        generation = self._cache.generation
        record = self._source.find_by_digest(digest)
        self._cache.put(digest, record, generation)
        return record
