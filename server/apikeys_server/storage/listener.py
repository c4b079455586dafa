"""PostgreSQL ``LISTEN`` for the change feed: wakes the follower the moment a change commits.

Only a wake-up: notifications sent while this connection is down are lost, so every
(re)connection wakes the follower too, and the follower reads the feed itself. The connection
is autocommit and dedicated (psycopg 3, outside SQLAlchemy's pools). While waiting it regains
control every ``check_seconds``, to stop or to reconnect when the follower asks (a connection
to a database that went silent may never report an error by itself).
"""

import logging
import threading

import psycopg
from sqlalchemy.engine import URL

from apikeys_server.storage.feed import FEED_CHANNEL

log = logging.getLogger(__name__)

RECONNECT_BACKOFF_SECONDS = (0.1, 0.25, 0.5, 1.0)


def conninfo(url: URL) -> str:
    """psycopg's connection string for a SQLAlchemy ``postgresql+psycopg`` URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class FeedListener:
    def __init__(
        self,
        dsn: str,
        wake: threading.Event,
        connect_timeout: float,
        check_seconds: float = 0.5,
    ) -> None:
        self._dsn = dsn
        self._wake = wake
        self._connect_timeout = max(2, round(connect_timeout))  # libpq's minimum is 2
        self._check_seconds = check_seconds
        self._stopping = threading.Event()
        self._reconnect = threading.Event()
        self._thread: threading.Thread | None = None
        self._listening = True  # logged on the first change only
        self._listened = False  # this connection got as far as LISTEN

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feed-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Asks the thread to stop; waits at most one check (a daemon thread still connecting
        to a hung database is left to the end of the process)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self._check_seconds)
            self._thread = None

    def reconnect(self) -> None:
        self._reconnect.set()

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._reconnect.clear()
            self._listened = False
            try:
                self._listen()
            except psycopg.Error as error:
                self._lost(type(error).__name__)
            # A connection that got as far as LISTEN starts the backoff over when it is lost.
            failures = 0 if self._listened else failures + 1
            delay = RECONNECT_BACKOFF_SECONDS[min(failures, len(RECONNECT_BACKOFF_SECONDS) - 1)]
            self._stopping.wait(delay)

    def _listen(self) -> None:
        with psycopg.connect(
            self._dsn, autocommit=True, connect_timeout=self._connect_timeout
        ) as connection:
            connection.execute(f"LISTEN {FEED_CHANNEL}")
            self._listened = True
            if not self._listening:
                self._listening = True
                log.info("change feed listener: listening again")
            self._wake.set()  # whatever was sent while we were away is in the feed
            while not (self._stopping.is_set() or self._reconnect.is_set()):
                for _ in connection.notifies(timeout=self._check_seconds):
                    self._wake.set()
        if self._reconnect.is_set() and not self._stopping.is_set():
            self._lost("asked to reconnect")

    def _lost(self, reason: str) -> None:
        if self._listening:
            self._listening = False
            log.warning("change feed listener: connection lost (%s); reconnecting", reason)
