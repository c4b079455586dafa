"""Following the change feed: evict what other processes changed, vouch for the cache's freshness.

One thread per process reads every change after the last position it applied: when woken by
the PostgreSQL listener (``LISTEN``, immediate), and at least every ``poll_seconds`` whatever
happens (notifications are lost while a listener is disconnected: the feed, not the wake-up, is
the truth). Each read that reaches the end of the feed confirms the cache: it may be trusted
until ``max_staleness`` after the read began. If the database cannot be read for longer than
that, the cache is no longer trusted (Verify goes to the database, and fails closed if it cannot)
and health turns NOT_SERVING until a read succeeds again.

The recent changes it applied are kept (bounded) for the watch streams of gateways.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Final, Protocol

from apikeys_server.domain.clock import Clock
from apikeys_server.domain.errors import FailedPrecondition, Unavailable
from apikeys_server.domain.ports import ChangeFeed, FeedUpdate
from apikeys_server.domain.records import KeyChange
from apikeys_server.storage.cache import KeyCache

log = logging.getLogger(__name__)

READ_BATCH: Final = 1000
RECENT_CHANGES: Final = 10_000
PRUNE_EVERY_SECONDS: Final = 600.0
STOP_WAIT_SECONDS: Final = 1.0


class Waker(Protocol):
    """What the follower needs from a listener: started, stopped, told to reconnect."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def reconnect(self) -> None: ...


class FeedFollower:
    def __init__(
        self,
        feed: ChangeFeed,
        cache: KeyCache,
        clock: Clock,
        *,
        poll_seconds: float,
        max_staleness: float,
        retention: timedelta,
        wake: threading.Event | None = None,
        listener: Waker | None = None,
        on_health: Callable[[bool], None] = lambda serving: None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._feed = feed
        self._cache = cache
        self._clock = clock
        self._poll_seconds = poll_seconds
        self._max_staleness = max_staleness
        self._retention = retention
        self._wake = wake or threading.Event()
        self._listener = listener
        self._on_health = on_health
        self._timer = timer
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._catching_up = threading.Lock()  # one reader of the feed at a time
        # Guards the fields below; watchers wait on it for new changes.
        self._changed = threading.Condition()
        self.position = 0
        self._recent: deque[KeyChange] = deque()
        self._recent_from = 0  # _recent holds every change after this position
        self._confirmed_at = -float("inf")
        self._confirm_time = clock.now()
        self._serving = True
        self._reading = True
        self._next_prune = 0.0
        self._closed = False
        self._following = False  # until the feed's head is known
        # Positions this process committed and evicted itself: no second eviction needed.
        self._applied_here: set[int] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Starts at the feed's head (the cache is empty: nothing older can be in it).

        A database unreachable now is not fatal: the cache stays untrusted (Verify goes to the
        database and fails closed), health says NOT_SERVING, and the loop keeps trying.
        """
        self.catch_up()
        self._check_health()
        self._thread = threading.Thread(target=self._run, name="feed-follower", daemon=True)
        self._thread.start()
        if self._listener is not None:
            self._listener.start()

    def stop(self) -> None:
        """Asks both threads to stop and waits briefly: they hold nothing to save, and one
        may be blocked on a hung database for its whole bound (they are daemon threads)."""
        self.end_watches()
        self._stopping.set()
        self._wake.set()
        if self._listener is not None:
            self._listener.stop()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT_SECONDS)
            self._thread = None

    def end_watches(self) -> None:
        """Ends every watch stream (at shutdown, before the server drains its calls)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def wake(self) -> None:
        self._wake.set()

    def committed_here(self, digests: list[bytes], positions: list[int]) -> None:
        """A change this process just committed: evicted now, skipped when read from the feed
        (evicting it again then would only drop a fresh entry and cost a lookup)."""
        for digest in digests:
            self._cache.evict(digest)
        with self._changed:
            # One already read from the feed (commit is visible before this runs) was evicted
            # then; remembering it would only leak.
            self._applied_here.update(p for p in positions if p > self.position)

    def head(self) -> int:
        return self._feed.head()

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._poll_seconds)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.catch_up()
                self._check_health()
                self._prune_when_due()
            except Exception:
                # Keep following: one bad round must not end freshness for good.
                log.exception("change feed: unexpected error; retrying")

    def catch_up(self) -> bool:
        """Applies every change after our position; True when it reached the end of the feed."""
        with self._catching_up:
            return self._catch_up()

    def _catch_up(self) -> bool:
        started = self._timer()
        try:
            if not self._following:
                self._start_at(self._feed.head())
            while True:
                batch = self._feed.read_changes(self.position, READ_BATCH)
                if batch.pruned_through > self.position:
                    self._fell_behind(batch.pruned_through)
                for change in batch.changes:
                    if change.position in self._applied_here:
                        with self._changed:
                            self._applied_here.discard(change.position)
                    else:
                        self._cache.evict(change.digest)
                if batch.changes:
                    self._publish(batch.changes)
                if len(batch.changes) < READ_BATCH:
                    break
        except Unavailable as error:
            self._read_failed(error)
            return False
        self._confirm(started)
        return True

    def _start_at(self, head: int) -> None:
        with self._changed:
            self.position = self._recent_from = head
        self._following = True
        log.info("following the change feed from position %d", head)

    def _fell_behind(self, horizon: int) -> None:
        log.warning(
            "change feed: position %d is behind the pruned horizon %d; cache cleared",
            self.position,
            horizon,
        )
        self._cache.clear()
        with self._changed:
            self._applied_here.clear()
            self.position = horizon
            self._recent.clear()
            self._recent_from = horizon

    def _publish(self, changes: list[KeyChange]) -> None:
        with self._changed:
            self._recent.extend(changes)
            while len(self._recent) > RECENT_CHANGES:
                self._recent_from = self._recent.popleft().position
            self.position = changes[-1].position
            self._changed.notify_all()

    def _confirm(self, started: float) -> None:
        """Everything committed before ``started`` has been applied."""
        self._cache.trust_until(started + self._max_staleness)
        with self._changed:
            self._confirmed_at = started
            self._confirm_time = self._clock.now()
            self._changed.notify_all()
        if not self._reading:
            self._reading = True
            log.info("change feed: caught up at position %d; database reachable", self.position)

    def _read_failed(self, error: Unavailable) -> None:
        if self._reading:
            self._reading = False
            cause = error.__cause__
            reason = type(cause).__name__ if cause is not None else str(error)
            log.warning(
                "change feed: cannot read the database (%s); "
                "cached answers trusted for %.1f s more",
                reason,
                max(0.0, self._confirmed_at + self._max_staleness - self._timer()),
            )
        if self._listener is not None:
            self._listener.reconnect()

    def _check_health(self) -> None:
        fresh = self._timer() <= self._confirmed_at + self._max_staleness
        if fresh == self._serving:
            return
        self._serving = fresh
        if fresh:
            log.info("change feed: fresh again; health SERVING")
        else:
            log.error(
                "change feed: not confirmed for over %.1f s (APIKEYS_MAX_STALENESS_SECONDS); "
                "cached answers are not used and health is NOT_SERVING",
                self._max_staleness,
            )
        self._on_health(fresh)

    @property
    def serving(self) -> bool:
        return self._serving

    def confirmed_age(self) -> float:
        """Seconds since the last read that reached the end of the feed (inf: none yet)."""
        return self._timer() - self._confirmed_at

    def _prune_when_due(self) -> None:
        now = self._timer()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_SECONDS
        try:
            pruned = self._feed.prune(self._clock.now() - self._retention)
        except Unavailable:
            self._next_prune = now + self._poll_seconds * 4  # soon, not on every tick
            return
        if pruned:
            log.info("change feed: pruned %d changes older than %s", pruned, self._retention)

    # -- watchers -----------------------------------------------------------------------------

    def updates(
        self, after: int, heartbeat: float, active: Callable[[], bool]
    ) -> Iterator[FeedUpdate]:
        """Every change after ``after``, then new ones as they are applied, and a heartbeat
        (an update without changes) at least every ``heartbeat`` seconds; ends when ``active``
        turns false or the follower stops. Raises FailedPrecondition if ``after`` was pruned.
        """
        position = after
        if position < self.position:
            # History to replay: the database is the authority (and knows what was pruned).
            update = self._read_backlog(position)
            position = update.position
            yield update
        while active():
            with self._changed:
                if self._closed:
                    return
                if position >= self._recent_from:
                    # Woken on every confirmation; speak on a change or when a heartbeat is due.
                    due = self._timer() + heartbeat
                    while self.position <= position and not self._closed:
                        left = due - self._timer()
                        if left <= 0:
                            break
                        self._changed.wait(left)
                    if self._closed:
                        return
                    changes = self._recent_after(position)
                    position = max(position, self.position)
                    update = FeedUpdate(changes, position, self._confirm_time)
                    backlog = False
                else:
                    backlog = True
            if backlog:
                update = self._read_backlog(position)
                position = update.position
            yield update

    def _recent_after(self, position: int) -> list[KeyChange]:
        """The kept changes after ``position`` (newest at the right: scan from there)."""
        changes = []
        for change in reversed(self._recent):
            if change.position <= position:
                break
            changes.append(change)
        changes.reverse()
        return changes

    def _read_backlog(self, after: int) -> FeedUpdate:
        """Changes older than those kept in memory, from the database."""
        with self._changed:
            applied, confirm_time = self.position, self._confirm_time
        batch = self._feed.read_changes(after, READ_BATCH)
        if batch.pruned_through > after:
            raise FailedPrecondition(
                f"changes after position {after} were pruned (the feed keeps them for "
                f"{self._retention}); clear your cache and watch from position 0",
                reason="FEED_POSITION_PRUNED",
            )
        if len(batch.changes) == READ_BATCH:
            return FeedUpdate(batch.changes, batch.changes[-1].position, confirm_time)
        # Fewer than a batch: the feed had nothing more, so everything up to what this
        # process had applied before the read (all committed by then) has been seen.
        last = batch.changes[-1].position if batch.changes else after
        return FeedUpdate(batch.changes, max(last, applied), confirm_time)


class NotFollowing:
    """The change source of a server told not to follow the feed (APIKEYS_FOLLOW_FEED=false)."""

    position = 0

    def head(self) -> int:
        return 0

    def updates(
        self, after: int, heartbeat: float, active: Callable[[], bool]
    ) -> Iterator[FeedUpdate]:
        raise FailedPrecondition(
            "this server does not follow the change feed (APIKEYS_FOLLOW_FEED=false)",
            reason="FEED_NOT_FOLLOWED",
        )
