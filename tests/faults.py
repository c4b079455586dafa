"""Helpers for the database-fault tests: a PostgreSQL URL routed through a TcpProxy, timings."""

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import make_url

from bench.tcp_proxy import TcpProxy


def proxy_to(postgres_url: str) -> TcpProxy:
    url = make_url(postgres_url)
    return TcpProxy((url.host or "127.0.0.1", url.port or 5432))


def through(proxy: TcpProxy, postgres_url: str) -> str:
    """``postgres_url`` with its host and port replaced by the proxy's."""
    url = make_url(postgres_url).set(host="127.0.0.1", port=proxy.port)
    return url.render_as_string(hide_password=False)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """(what ``call`` returned or raised, seconds it took)."""
    started = time.monotonic()
    try:
        outcome: Any = call()
    except Exception as error:
        outcome = error
    return outcome, time.monotonic() - started
