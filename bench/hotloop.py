"""Verify handlers in a hot loop, in process: ``python -m bench.hotloop``.

The real App (SQLite, default settings but a one-hour cache TTL) is built but not started;
its Verify handler, the authenticated echo's and the inline floor's (bench/floor.py) are
called directly, 1 000 requests a pass, with a stand-in for gRPC's context that carries the
caller's ``x-api-key``. Figures are the best pass's thread CPU per call: what each handler
costs with every cache warm and no gRPC, kernel or other thread between two calls. Against
``make bench``'s "in handler" column (the same handlers timed inside the serving process)
it shows how much dearer every microsecond of handler is in a real server. Seconds to run;
no server, no load generator, nothing pinned.
"""

import argparse
import gc
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from apikeys.v1 import key_verifier_pb2
from apikeys_server.app import App
from apikeys_server.config import Settings
from apikeys_server.rpc.key_verifier import KeyVerifierServicer
from bench import fixtures
from bench.echo import AuthenticatedEchoVerifier, stored_digests
from bench.floor import floor_handler


class _Context:
    """What a Verify handler reads of gRPC's ServicerContext on its answering path."""

    def __init__(self, caller_key: str) -> None:
        self._metadata = (("user-agent", "grpc-python"), ("x-api-key", caller_key))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def _best_us(
    call: Callable[[Any, Any], Any], requests: list[Any], context: Any, passes: int
) -> float:
    best = float("inf")
    for _ in range(passes):
        started = time.thread_time_ns()
        for request in requests:
            call(request, context)
        best = min(best, (time.thread_time_ns() - started) / len(requests))
    return best / 1000


def _request(key: str) -> key_verifier_pb2.VerifyRequest:
    # Decoded from bytes, as the server gets it (upb builds its fields on first read).
    built = key_verifier_pb2.VerifyRequest(key=key, tenant_id=fixtures.TENANT)
    built.required_scopes.extend(fixtures.REQUIRED)
    return key_verifier_pb2.VerifyRequest.FromString(built.SerializeToString())


def measure(working_set: int, passes: int) -> dict[str, float]:
    """µs of thread CPU per call: name -> figure."""
    with tempfile.TemporaryDirectory(prefix="apikeys-hotloop-") as temporary:
        db = fixtures.prepare(fixtures.sqlite_url(Path(temporary), "hot.db"), working_set)
        settings = Settings(database_url=db.url, cache_ttl_seconds=3600.0, listen="127.0.0.1:0")
        app = App(settings)
        try:
            servicer = KeyVerifierServicer(app.services.verifier, app.services.changes, 1)
            floor = floor_handler(app, KeyVerifierServicer.Verify)
            echo = AuthenticatedEchoVerifier(stored_digests(db.url))
            context: Any = _Context(db.caller)
            valid = [_request(key.secret) for key in db.keys]
            unknown_keys = fixtures.unknown_keys(working_set)
            # Right prefix and length, wrong checksum (as make bench's malformed row).
            malformed = [
                _request(key[:-1] + ("0" if key[-1] != "0" else "1")) for key in unknown_keys
            ]
            unknown = [_request(key) for key in unknown_keys]
            cases: dict[str, tuple[Callable[[Any, Any], Any], list[Any]]] = {
                "authenticated echo": (echo.Verify, valid),
                "cache hit, inline floor": (lambda r, c: floor(servicer, r, c), valid),
                "cache hit": (servicer.Verify, valid),
                "malformed key": (servicer.Verify, malformed),
                "unknown key (repeated)": (servicer.Verify, unknown),
            }
            for call, requests in cases.values():  # fill the caches; check the hit path
                for request in requests:
                    call(request, context)
            assert all(servicer.Verify(request, context).valid for request in valid)
            gc.freeze()  # as serve runs; undone below, for a caller that goes on (tests)
            try:
                return {
                    name: _best_us(call, requests, context, passes)
                    for name, (call, requests) in cases.items()
                }
            finally:
                gc.unfreeze()
        finally:
            app.services.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotloop", description=__doc__)
    parser.add_argument("--working-set", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=80, help="best of (80)")
    args = parser.parse_args(argv)
    figures = measure(args.working_set, args.passes)
    reference = figures["authenticated echo"]
    print("| handler | µs per call | × authenticated echo |")
    print("|---|---:|---:|")
    for name, figure in figures.items():
        print(f"| {name} | {figure:.2f} | {figure / reference:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
