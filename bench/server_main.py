"""A benchmark server process: ``python -m bench.server_main echo|echo-auth|verify``.

``verify-echo-auth`` (a diagnostic, not in ``make bench``): the real server, as ``verify`` builds
it, whose Verify handler is the authenticated echo's; against ``echo-auth`` it tells the cost of
everything around the handler (registration, background threads) from the handler's own.
``verify-floor`` (a diagnostic too): the real server with the inline hit path of bench/floor.py.

Settings come from the APIKEYS_* environment, like ``apikeys-server serve``, with the port
forced to a free one. Prints ``READY <port>`` once serving; stops when stdin closes, then
prints ``HANDLER <ns> <calls>``: the CPU time its threads spent inside Verify handlers (and,
with BENCH_SEGMENTS=name,..., ``SEGMENT <name> <ns> <calls>`` for parts of them: see
``python -m bench.segments``).

Both servers time their handler the same way (the thread's own CPU clock, so waits for the
GIL are not counted), which tells the gRPC stack's share of a call from the handler's.
"""

import gc
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from apikeys.v1 import key_verifier_pb2
from apikeys_server import app
from apikeys_server.app import create_server
from apikeys_server.config import Settings
from apikeys_server.rpc.key_verifier import KeyVerifierServicer
from bench import echo, floor
from bench.echo import AuthenticatedEchoVerifier, EchoVerifier, echo_server, stored_digests

# Parts of the Verify path that ``python -m bench.segments`` can time inside the server:
# name -> (module, attribute path). Patched on the class or module the caller looks them up in.
SEGMENTS: dict[str, tuple[str, str]] = {
    "caller_key": ("apikeys_server.rpc.key_verifier", "caller_key"),
    "authenticate": ("apikeys_server.domain.verifier", "Verifier._admit"),
    "verify": ("apikeys_server.domain.verifier", "Verifier.verify"),
    "verify_response": ("apikeys_server.rpc.convert", "verify_response"),
    "check": ("apikeys_server.domain.verifier", "Verifier.check"),
    "is_well_formed": ("apikeys_server.domain.key_format", "KeyFormat.is_well_formed"),
    "digest": ("apikeys_server.domain.verifier", "digest"),
    "cache_read": ("apikeys_server.storage.cache", "KeyCache.cached"),
    "cache_load": ("apikeys_server.storage.cache", "CachedKeyLookup.load"),
    "store_lookup": ("apikeys_server.storage.repository", "SqlKeyStore.find_by_digest"),
    "cache_put": ("apikeys_server.storage.cache", "KeyCache.put"),
    "last_used": ("apikeys_server.storage.last_used", "LastUsedRecorder.record"),
    "clock": ("apikeys_server.domain.clock", "SystemClock.now"),
}


class HandlerClock:
    def __init__(self) -> None:
        # One entry per thread, written only by that thread: no lock on the hot path.
        self._spent: dict[int, list[int]] = {}

    def wrap(self, owner: Any, name: str) -> None:
        """Replaces ``owner.name`` (a function or method) by a timed one."""
        inner: Callable[..., Any] = getattr(owner, name)
        spent = self._spent

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                mine = spent.get(threading.get_ident())
                if mine is None:
                    mine = spent[threading.get_ident()] = [0, 0]
                mine[0] += time.thread_time_ns() - start
                mine[1] += 1

        setattr(owner, name, timed)

    def totals(self) -> tuple[int, int]:
        entries = list(self._spent.values())
        return sum(entry[0] for entry in entries), sum(entry[1] for entry in entries)


def _segment_clocks(names: str) -> dict[str, HandlerClock]:
    clocks = {}
    for name in filter(None, names.split(",")):
        module_name, path = SEGMENTS[name]
        owner: Any = importlib.import_module(module_name)
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        clocks[name] = HandlerClock()
        clocks[name].wrap(owner, attribute)
    return clocks


def _stock_transport() -> None:
    """``BENCH_TRANSPORT=stock``: gRPC's own thread pool (a call takes a thread from its
    start, the queue is unbounded): the server as it was before rpc/dispatch.py, with the
    same options, for before/after figures from one run."""

    def stock_server(settings: Settings, _pool: object = None) -> grpc.Server:
        pool = futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="rpc")
        return grpc.server(pool, options=app.server_options(settings))

    for module in (app, echo):
        setattr(module, "make_grpc_server", stock_server)  # noqa: B010


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "verify"
    if os.environ.get("BENCH_TRANSPORT", "dispatch") == "stock":
        _stock_transport()
    settings = Settings.from_env(os.environ, listen="127.0.0.1:0")
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr)
    clock = HandlerClock()
    segments = _segment_clocks(os.environ.get("BENCH_SEGMENTS", ""))
    stop: Callable[[], object]
    if mode in ("echo", "echo-auth"):
        servicer: EchoVerifier
        if mode == "echo":
            clock.wrap(EchoVerifier, "Verify")
            servicer = EchoVerifier()
        else:
            # The keys of the scenario's database (APIKEYS_DATABASE_URL), for its dict.
            clock.wrap(AuthenticatedEchoVerifier, "Verify")
            servicer = AuthenticatedEchoVerifier(stored_digests(settings.database_url))
        server, port = echo_server(settings, servicer)
        server.start()
        stop = lambda: server.stop(0).wait()  # noqa: E731
    elif mode in ("verify", "verify-echo-auth", "verify-floor"):
        if mode == "verify-echo-auth":
            known = AuthenticatedEchoVerifier(stored_digests(settings.database_url))

            def echoed(
                _self: object, request: Any, context: grpc.ServicerContext
            ) -> key_verifier_pb2.VerifyResponse:
                return known.Verify(request, context)

            KeyVerifierServicer.Verify = echoed  # type: ignore[method-assign]
        bind_floor = floor.install() if mode == "verify-floor" else None
        clock.wrap(KeyVerifierServicer, "Verify")
        app = create_server(settings)
        if bind_floor is not None:
            bind_floor(app)
        app.start()
        port = app.port
        stop = lambda: app.stop(0)  # noqa: E731
    else:
        print(
            f"unknown mode {mode!r}: echo, echo-auth, verify, verify-echo-auth or verify-floor",
            file=sys.stderr,
        )
        return 2
    # What `python -m bench --gc` asks of both servers alike (default: as `serve` runs).
    collector = os.environ.get("BENCH_GC", "serve")
    if collector == "serve":
        gc.freeze()  # as `apikeys-server serve` does after start-up
    elif collector == "off":
        gc.disable()
    print(f"READY {port}", flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us
    stop()
    for name, segment in segments.items():
        print("SEGMENT {} {} {}".format(name, *segment.totals()))
    print("HANDLER {} {}".format(*clock.totals()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
