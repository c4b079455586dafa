"""Database failures as domain errors, in one place for every storage module."""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from apikeys_server.domain.errors import FailedPrecondition, Unavailable


@contextmanager
def database_errors() -> Iterator[None]:
    """Connection trouble becomes UNAVAILABLE: callers fail closed and may retry."""
    try:
        yield
    except IntegrityError as error:
        raise FailedPrecondition("the change conflicts with a concurrent one; retry") from error
    except (OperationalError, DBAPIError, PoolTimeout) as error:
        raise Unavailable("the key database is unavailable; retry later") from error
