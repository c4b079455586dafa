"""Verify answers kept in process, evicted by the server's change feed (WatchKeyChanges).

``CachingVerifier`` (threads) and ``AsyncCachingVerifier`` (asyncio) share ``VerifyCache``: the
cache itself, the rules for trusting it, and what to do with each stream message. They differ
only in how they call the server and run the watch.

* Entries are keyed by the SHA-256 of the key (and the tenant asked for); the plaintext is
  never kept. Bounded (least recently used out first).
* Only VALID and INSUFFICIENT_SCOPE answers are cached: they carry the key's identity (key id,
  tenant, name, scopes, expire time), from which the answer for any required scopes is decided
  here as the server would (and an expired key goes back to the server). Only scopes the server
  has accepted in some request are decided here: it answers INVALID_ARGUMENT for a scope not in
  its catalog, so an unknown one goes to it. Refused answers
  (NOT_FOUND, REVOKED, EXPIRED, MALFORMED, MISSING) are not cached: a NOT_FOUND cached would
  deny a key created a moment later, refusals are rare in steady state, and the server's own
  cache already answers repeated bad keys cheaply.
* The cache is trusted only while the watch is following the feed: it has heard from the
  stream (the server sends a heartbeat at least every second) within ``max_staleness``
  (default 3 s). Past that, every call goes to the server until the stream is back, so a VALID
  served from here never reflects the feed older than the bound.
* An answer is stored only if it reflects at least the feed position the watch has applied
  (``feed_position``): an answer that raced a change the watch already evicted is not stored.
* A change for a key id evicts every entry of that key (a key id → digests map); the stream
  reconnects with backoff and resumes after the last position; FAILED_PRECONDITION (position
  pruned) clears everything and watches from 0 (now); a stream started from 0 clears the cache
  at its first message, as changes before it cannot be known.
"""

import asyncio
import contextlib
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc

from apikeys.v1 import key_verifier_pb2
from apikeys_client._errors import ApiKeysError

if TYPE_CHECKING:
    from apikeys_client._aio import AsyncApiKeysClient
    from apikeys_client._client import ApiKeysClient, WatchStream

VALID = key_verifier_pb2.VERIFY_CODE_VALID
INSUFFICIENT_SCOPE = key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
DEFAULT_MAX_STALENESS_SECONDS = 3.0
DEFAULT_MAX_ENTRIES = 10_000
_ANSWERS_PER_KEY = 8  # answers kept per key, one per set of required scopes asked


@dataclass(slots=True)
class _Entry:
    key_id: str
    tenant_id: str
    name: str
    scopes: frozenset[str]
    sorted_scopes: tuple[str, ...]
    expire_time: datetime | None
    response: key_verifier_pb2.VerifyResponse  # the one the server gave, for its fields
    answers: dict[frozenset[str], key_verifier_pb2.VerifyResponse] = field(default_factory=dict)


class VerifyCache:
    """The cache and its rules, without I/O; thread-safe."""

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_staleness: float = DEFAULT_MAX_STALENESS_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.max_entries = max_entries
        self.max_staleness = max_staleness
        self._monotonic = monotonic
        self._now = now
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[bytes, str], _Entry] = OrderedDict()
        self._by_key_id: dict[str, set[tuple[bytes, str]]] = {}
        # Scopes the server accepted in a request (Verify answers INVALID_ARGUMENT for a scope
        # not in the catalog): other scopes are asked of the server, which then knows them.
        self._known_scopes: set[str] = set()
        self.position = 0  # the last feed position applied
        self._synced = False  # a stream message has been applied since the last reset
        self._heard = float("-inf")  # monotonic time of the last stream message

    # -- answers ----------------------------------------------------------------------------

    def trusted(self) -> bool:
        return self._synced and self._monotonic() - self._heard <= self.max_staleness

    def lookup(
        self, key: str, required_scopes: Iterable[str], tenant_id: str
    ) -> tuple[tuple[bytes, str], key_verifier_pb2.VerifyResponse | None]:
        """The cache slot for this key, and the answer decided here (None: ask the server)."""
        slot = (hashlib.sha256(key.encode()).digest(), tenant_id)
        if not self.trusted():
            return slot, None
        required = (
            required_scopes
            if isinstance(required_scopes, frozenset)
            else frozenset(required_scopes)
        )
        with self._lock:
            entry = self._entries.get(slot)
            if entry is None or not required <= self._known_scopes:
                return slot, None
            if entry.expire_time is not None and entry.expire_time <= self._now():
                self._drop(slot)
                return slot, None  # the server says EXPIRED (and from when)
            answer = entry.answers.get(required)
            if answer is None:
                answer = self._answer(entry, required)
                if len(entry.answers) >= _ANSWERS_PER_KEY:
                    entry.answers.clear()
                entry.answers[required] = answer
            self._entries.move_to_end(slot)
            return slot, answer

    @staticmethod
    def _answer(entry: _Entry, required: frozenset[str]) -> key_verifier_pb2.VerifyResponse:
        """What Verify answers for this key and these scopes (rpc/convert.py's fields)."""
        answer = key_verifier_pb2.VerifyResponse()
        answer.CopyFrom(entry.response)
        del answer.missing_scopes[:]
        missing = sorted(required - entry.scopes)
        if missing:
            answer.valid, answer.code, answer.http_status = False, INSUFFICIENT_SCOPE, 403
            answer.missing_scopes.extend(missing)
        else:
            answer.valid, answer.code, answer.http_status = True, VALID, 200
        return answer

    def store(
        self,
        slot: tuple[bytes, str],
        required_scopes: Iterable[str],
        response: key_verifier_pb2.VerifyResponse,
    ) -> None:
        """Keeps the server's answer if it carries the key and is not older than the feed."""
        with self._lock:
            self._known_scopes.update(required_scopes)
            self._known_scopes.update(response.scopes)
        if response.code not in (VALID, INSUFFICIENT_SCOPE) or not response.key_id:
            return
        expire = (
            response.expire_time.ToDatetime(tzinfo=UTC)
            if response.HasField("expire_time")
            else None
        )
        entry = _Entry(
            key_id=response.key_id,
            tenant_id=response.tenant_id,
            name=response.name,
            scopes=frozenset(response.scopes),
            sorted_scopes=tuple(response.scopes),
            expire_time=expire,
            response=response,
        )
        with self._lock:
            if not self._synced or response.feed_position < self.position:
                return  # may predate a change already applied: not stored
            self._drop(slot)
            self._entries[slot] = entry
            self._by_key_id.setdefault(entry.key_id, set()).add(slot)
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, slot: tuple[bytes, str]) -> None:
        entry = self._entries.pop(slot, None)
        if entry is not None:
            slots = self._by_key_id.get(entry.key_id)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._by_key_id[entry.key_id]

    # -- the stream -------------------------------------------------------------------------

    def apply(self, message: key_verifier_pb2.WatchKeyChangesResponse) -> None:
        """One stream message: evict the keys it names, note its position and that it came."""
        with self._lock:
            if not self._synced:
                self._clear()  # changes before the first message of this stream are unknown
                self._synced = True
            for change in message.changes:
                for slot in list(self._by_key_id.get(change.key_id, ())):
                    self._drop(slot)
            self.position = max(self.position, message.position)
            self._heard = self._monotonic()

    def reset(self) -> None:
        """The position was pruned: forget everything and watch from 0 (now)."""
        with self._lock:
            self._clear()
            self.position = 0
            self._synced = False

    def _clear(self) -> None:
        self._entries.clear()
        self._by_key_id.clear()

    def __len__(self) -> int:
        return len(self._entries)


class _Backoff:
    def __init__(self, first: float = 0.05, most: float = 2.0) -> None:
        self._first, self._most, self.delay = first, most, first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self._most, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = self._first


def _watch_failed(cache: VerifyCache, error: ApiKeysError) -> None:
    if error.code == grpc.StatusCode.FAILED_PRECONDITION:
        cache.reset()


class CachingVerifier:
    """``verify`` as ``ApiKeysClient.verify``, answered from a cache followed by the change
    feed where it can (see the module notes). ``tenant_id`` limits the watch to one tenant
    (needed for a tenant caller key; a platform key may watch all). Use as a context manager
    or call ``close()`` (the client is not closed here)."""

    def __init__(
        self,
        client: "ApiKeysClient",
        *,
        tenant_id: str = "",
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_staleness: float = DEFAULT_MAX_STALENESS_SECONDS,
        watch: bool = True,
    ) -> None:
        self.client = client
        self.cache = VerifyCache(max_entries=max_entries, max_staleness=max_staleness)
        self._tenant_id = tenant_id
        self._stopped = threading.Event()
        self._stream: WatchStream | None = None
        self._stream_lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="apikeys-watch", daemon=True)
        if watch:
            self._thread.start()

    def verify(
        self, key: str, required_scopes: Iterable[str] = (), *, tenant_id: str = ""
    ) -> key_verifier_pb2.VerifyResponse:
        """The answer Verify would give. Answers from the cache are shared: do not modify."""
        required_scopes = tuple(required_scopes)  # an iterator is read once
        slot, answer = self.cache.lookup(key, required_scopes, tenant_id)
        if answer is not None:
            return answer
        required = tuple(required_scopes)
        response = self.client.verify(key, required, tenant_id=tenant_id)
        self.cache.store(slot, required, response)
        return response

    def _watch(self) -> None:
        backoff = _Backoff()
        while not self._stopped.is_set():
            stream = self.client.watch_key_changes(self.cache.position, tenant_id=self._tenant_id)
            with self._stream_lock:
                if self._stopped.is_set():
                    stream.cancel()
                    return
                self._stream = stream
            try:
                for message in stream:
                    self.cache.apply(message)
                    backoff.reset()
            except ApiKeysError as error:
                _watch_failed(self.cache, error)
            self._stopped.wait(backoff.next())

    def stop_watching(self) -> None:
        """Ends the watch (the cache then stops being trusted within ``max_staleness``)."""
        with self._stream_lock:
            self._stopped.set()
            if self._stream is not None:
                self._stream.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    close = stop_watching

    def __enter__(self) -> "CachingVerifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCachingVerifier:
    """``CachingVerifier`` for ``AsyncApiKeysClient``: the watch runs as an asyncio task,
    started by ``start()`` or ``async with``; ``await close()`` ends it."""

    def __init__(
        self,
        client: "AsyncApiKeysClient",
        *,
        tenant_id: str = "",
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_staleness: float = DEFAULT_MAX_STALENESS_SECONDS,
    ) -> None:
        self.client = client
        self.cache = VerifyCache(max_entries=max_entries, max_staleness=max_staleness)
        self._tenant_id = tenant_id
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def verify(
        self, key: str, required_scopes: Iterable[str] = (), *, tenant_id: str = ""
    ) -> key_verifier_pb2.VerifyResponse:
        """The answer Verify would give. Answers from the cache are shared: do not modify."""
        required_scopes = tuple(required_scopes)  # an iterator is read once
        slot, answer = self.cache.lookup(key, required_scopes, tenant_id)
        if answer is not None:
            return answer
        required = tuple(required_scopes)
        response = await self.client.verify(key, required, tenant_id=tenant_id)
        self.cache.store(slot, required, response)
        return response

    async def _watch(self) -> None:
        backoff = _Backoff()
        while True:
            stream = self.client.watch_key_changes(self.cache.position, tenant_id=self._tenant_id)
            try:
                async for message in stream:
                    self.cache.apply(message)
                    backoff.reset()
            except ApiKeysError as error:
                _watch_failed(self.cache, error)
            finally:
                await stream.aclose()
            await asyncio.sleep(backoff.next())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self) -> "AsyncCachingVerifier":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
