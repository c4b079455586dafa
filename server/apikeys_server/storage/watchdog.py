"""A client-side bound on every database operation: the one that holds when packets vanish.

Connect and statement timeouts need an answer from somewhere; behind a path that silently drops
packets none comes, and a blocked psycopg call waits for TCP to give up (many minutes). Each
pooled connection gets a deadline when it is checked out and loses it at checkin. A thread looks
at the deadlines every ``tick`` seconds and shuts down the socket of a connection still out past
its own: the blocked call fails at once with OperationalError and SQLAlchemy discards the
connection. The cost is a dict entry at checkout and a lock at checkin (~1 µs in all).
"""

import logging
import math
import os
import socket
import threading
import time
from typing import Any

from sqlalchemy import Engine, event

log = logging.getLogger(__name__)


class ConnectionWatchdog:
    def __init__(self, tick: float = 0.05) -> None:
        self._tick = tick
        # Checked-out driver connection -> monotonic deadline (inf once shut down).
        self._deadlines: dict[Any, float] = {}
        self._shut: set[Any] = set()
        # Held while forgetting a connection and while shutting one down, so a socket number
        # freed by a closed connection and reused by a new one is never shut by mistake.
        # Checkout needs no lock: a new entry is never due yet.
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, engine: Engine, seconds: float) -> None:
        """Bounds every checkout of ``engine``'s pool to ``seconds``."""
        deadlines, shut, lock, clock = self._deadlines, self._shut, self._lock, time.monotonic

        def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            deadlines[dbapi_connection] = clock() + seconds

        def on_checkin(dbapi_connection: Any, _record: Any) -> None:
            with lock:
                deadlines.pop(dbapi_connection, None)
                if shut:
                    shut.discard(dbapi_connection)

        def on_invalidate(dbapi_connection: Any, record: Any, _error: Any) -> None:
            on_checkin(dbapi_connection, record)

        event.listen(engine.pool, "checkout", on_checkout)
        event.listen(engine.pool, "checkin", on_checkin)
        # Fired before an invalidated connection is closed, so its socket number is forgotten first.
        event.listen(engine.pool, "invalidate", on_invalidate)

    def deadline_passed(self, dbapi_connection: Any) -> bool:
        """Whether this checked-out connection failed because the watchdog shut it down."""
        return dbapi_connection in self._shut

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="db-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self._tick):
            try:
                self.shut_overdue(time.monotonic())
            except Exception:
                log.exception("database watchdog check failed")

    def shut_overdue(self, now: float) -> int:
        """Shuts down the sockets of connections out past their deadline; returns how many."""
        overdue = [conn for conn, at in self._deadlines.copy().items() if at <= now]
        shut = 0
        for connection in overdue:
            with self._lock:
                at = self._deadlines.get(connection)
                if at is None or at > now:
                    continue  # returned to the pool, or checked out again, meanwhile
                self._deadlines[connection] = math.inf
                self._shut.add(connection)
                shut += _shut_down(connection)
            log.warning("a database operation ran past its bound; its connection was shut down")
        return shut


def _shut_down(dbapi_connection: Any) -> int:
    """Shuts the driver connection's socket (through a duplicate, so the driver still owns it)."""
    try:
        descriptor = dbapi_connection.fileno()
        with socket.socket(fileno=os.dup(descriptor)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception as error:  # the driver closed it meanwhile: nothing left to shut
        log.debug("could not shut down a database socket: %s", error)
        return 0
    return 1
