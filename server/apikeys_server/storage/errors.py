"""Database failures as domain errors, in one place for every storage module."""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from apikeys_server.domain.errors import Aborted, Unavailable


class _Failures:
    """Database operations that failed (conflicts apart), counted for the metrics. One count
    per process: every Database of it reports through here."""

    count = 0


FAILURES = _Failures()


@contextmanager
def database_errors() -> Iterator[None]:
    """A conflict with a concurrent change is ABORTED (AIP-193: retrying the whole call may
    succeed); connection trouble becomes UNAVAILABLE: callers fail closed and may retry."""
    try:
        yield
    except IntegrityError as error:
        raise Aborted(
            "the change conflicts with a concurrent one; retry", reason="CONFLICT"
        ) from error
    except (OperationalError, DBAPIError, PoolTimeout) as error:
        FAILURES.count += 1
        raise Unavailable(
            "the key database is unavailable; retry later", reason="DATABASE_UNAVAILABLE"
        ) from error
