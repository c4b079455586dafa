"""Last-used times, gathered in memory on the Verify path and written in batches.

Recording keeps the latest time per key in a dict under a lock; a background thread flushes
every ``interval`` seconds (and on stop) with one batched UPDATE that never moves a time backwards.
"""

import logging
import threading
import time
from datetime import datetime

from apikeys_server.domain.errors import Unavailable
from apikeys_server.domain.ports import KeyStore

log = logging.getLogger(__name__)


class LastUsedRecorder:
    def __init__(self, store: KeyStore, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._lock = threading.Lock()
        self._pending: dict[str, datetime] = {}
        self._stopping = threading.Event()
        self._failed_while_stopping = False
        self._thread: threading.Thread | None = None
        # When the gathered times were last all written (monotonic): the flush lag's origin.
        self.flushed_at = time.monotonic()

    def pending(self) -> int:
        """Keys whose last-used time is gathered but not yet written."""
        with self._lock:
            return len(self._pending)

    def record(self, key_id: str, when: datetime) -> None:
        # Concurrent verifies may arrive out of order: keep the latest, never move back.
        with self._lock:
            pending = self._pending.get(key_id)
            if pending is None or pending < when:
                self._pending[key_id] = when

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="last-used-flush", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the flush thread, then writes what is left: one try, under the write bound.

        A flush the thread had under way when stop came counts as that try if it failed, so
        shutdown with a dead database waits one write bound, not two.
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failed_while_stopping:
            with self._lock:
                dropped = len(self._pending)
            log.warning("last-used times of %d keys not written: database unavailable", dropped)
            return
        self.flush()

    def flush(self) -> int:
        """Writes what was gathered; on failure keeps it for the next try. Returns keys written."""
        started = time.monotonic()
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            self.flushed_at = started
            return 0
        try:
            self._store.touch_last_used(batch)
        except Unavailable:
            self._failed_while_stopping = self._stopping.is_set()
            log.warning("could not write last-used times of %d keys; will retry", len(batch))
            with self._lock:
                for key_id, when in batch.items():
                    newer = self._pending.get(key_id)
                    if newer is None or newer < when:
                        self._pending[key_id] = when
            return 0
        self.flushed_at = started
        return len(batch)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.flush()
            except Exception:
                # Keep the thread alive: one bad batch must not stop every later flush.
                log.exception("last-used flush failed; that batch is dropped")
