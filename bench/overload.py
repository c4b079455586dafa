"""``python -m bench overload``: the transport under overload and under abuse, before vs after.

Two transports, each serving in its own pinned server process (as ``make bench``): gRPC's
own thread pool (``BENCH_TRANSPORT=stock``: the server before rpc/dispatch.py) and the
dispatcher (what ships). Every call is checked byte for byte; calls answered without a
message (refused with RESOURCE_EXHAUSTED, or expired at their deadline) are counted apart.

1. **Cache hits** (SQLite, 1 000 keys, every call a hit), where the one core is the limit:
   - saturation, 4 connections x 16 calls in flight: calls/s and server CPU per call;
   - 400 calls in flight (4 x 100, six times what saturates), each with a 100 ms deadline;
   - open loop at twice the saturation rate, 100 ms deadlines;
   - a probe of 500 calls/s (1 s deadline) alone, then beside a client holding 1 000 calls
     whose bodies never finish, over 10 connections.
2. **A slow database** (PostgreSQL behind a proxy adding 10 ms to every answer; the positive
   cache bounded to 100 keys so every verified key is a lookup), where the worker threads are
   the limit: saturation, then open loop at twice it, 100 ms deadlines.

The server's per-connection stream cap is raised to 5 000 for all of it, so that the load
generator's few connections are not what limits the calls in flight.
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench import fixtures, sections, workloads
from bench.runner import ROOT, Load, ServerProcess, pinned_load, run_h2gen, sample
from bench.tcp_proxy import TcpProxy
from bench.unfinished import UnfinishedStreams
from bench.workloads import VERIFY_PATH, Call

TRANSPORTS = (("stock", "gRPC's own pool (before)"), ("dispatch", "dispatcher (now)"))
DEADLINE_MS = 100
PROBE_RATE = 500.0
PROBE_DEADLINE_MS = 1000
SLOW_DATABASE_SECONDS = 0.010
STREAMS_PER_CONNECTION = "5000"


def _phases(
    load: Load, server: ServerProcess, caller: str, calls: list[Call], abuse: bool
) -> dict[str, Any]:
    """Saturation, then twice its rate; with ``abuse``, also 400 in flight and the probes."""

    def generate(
        phase: Load, rate: float | None, deadline_ms: int | None, depth: int | None = None
    ) -> dict[str, Any]:
        return run_h2gen(
            server.port,
            server.pid,
            caller,
            calls,
            phase,
            rate,
            deadline_ms=deadline_ms,
            depth=depth,
        )

    saturation = generate(load, None, None)
    doubled = generate(
        replace(load, warmup=0.5), 2 * saturation["throughput"], DEADLINE_MS, 100_000
    )
    if not abuse:
        return {"saturation": saturation, "doubled": doubled}
    crowded = generate(replace(load, depth=100), None, DEADLINE_MS)
    probe = replace(load, warmup=0.2, latency_seconds=3.0, connections=1)
    quiet = generate(probe, PROBE_RATE, PROBE_DEADLINE_MS, 10_000)
    with UnfinishedStreams(server.port, VERIFY_PATH, connections=10, streams=100):
        time.sleep(0.5)
        abused = generate(probe, PROBE_RATE, PROBE_DEADLINE_MS, 10_000)
    return {
        "saturation": saturation,
        "crowded": crowded,
        "doubled": doubled,
        "probe_quiet": quiet,
        "probe_abused": abused,
    }


def _measured(
    env: dict[str, str],
    transport: str,
    load: Load,
    log_path: Path,
    phases: Callable[[ServerProcess], dict[str, Any]],
) -> dict[str, Any]:
    """``phases`` run against a fresh server of ``transport``, checked."""
    env = {**env, "BENCH_TRANSPORT": transport}
    env["APIKEYS_MAX_STREAMS_PER_CONNECTION"] = STREAMS_PER_CONNECTION
    with open(log_path, "ab") as log:
        server = ServerProcess("verify", env, load.server_core, log)
        try:
            return _checked(phases(server), transport)
        finally:
            server.stop()


def run(load: Load, directory: Path, postgres_url: str | None) -> dict[str, Any]:
    small = fixtures.prepare(fixtures.sqlite_url(directory, "overload.db"), 1000)
    hits = workloads.valid(small.caller, small.keys, small.feed_position).make(0)
    env = {"APIKEYS_DATABASE_URL": small.url, "APIKEYS_CACHE_TTL_SECONDS": "3600"}
    log_path = directory / "server.log"
    result: dict[str, Any] = {"cache_hit": {}, "slow_database": {}, "slow_skipped": ""}

    def cache_hits(server: ServerProcess) -> dict[str, Any]:
        wrong = sample(server.port, small.caller, hits[:20])
        if wrong:
            raise RuntimeError(f"cache hit: {wrong[0]}")
        return _phases(load, server, small.caller, hits, abuse=True)

    for transport, _ in TRANSPORTS:
        phases = _measured(env, transport, load, log_path, cache_hits)
        result["cache_hit"][transport] = phases
        _say(transport, "cache hit", phases["saturation"])
    if postgres_url is None:
        result["slow_skipped"] = "no PostgreSQL asked for"
        return result
    with fixtures.postgres_database(postgres_url) as url:
        database = fixtures.prepare(url, 1000)
        misses = workloads.valid(database.caller, database.keys, database.feed_position).make(0)
        direct = make_url(url)
        for transport, _ in TRANSPORTS:
            proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432), lifetime=600.0)
            proxied = direct.set(host="127.0.0.1", port=proxy.port)
            slow = {
                "APIKEYS_DATABASE_URL": proxied.render_as_string(hide_password=False),
                "APIKEYS_CACHE_SIZE": "100",
            }

            def slow_database(server: ServerProcess, proxy: TcpProxy = proxy) -> dict[str, Any]:
                proxy.delay = SLOW_DATABASE_SECONDS
                return _phases(load, server, database.caller, misses, abuse=False)

            try:
                phases = _measured(slow, transport, load, log_path, slow_database)
            finally:
                proxy.stop()
            result["slow_database"][transport] = phases
            _say(transport, "slow database", phases["saturation"])
    return result


def _checked(phases: dict[str, Any], what: str) -> dict[str, Any]:
    """The phases, once every answer with a message was the expected one."""
    for name, run in phases.items():
        if run["wrong"] or run["reset"]:
            raise RuntimeError(f"{what}, {name}: {run['wrong']} wrong, {run['reset']} reset")
    return phases


def _say(transport: str, what: str, saturation: dict[str, Any]) -> None:
    print(
        f"[bench] {transport}, {what}: {saturation['throughput']:,.0f} calls/s, "
        f"{saturation['server_cpu_us_per_call'] or 0:.0f} µs CPU/call",
        file=sys.stderr,
        flush=True,
    )


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value / 1000:,.1f}"


def _answered(run: dict[str, Any]) -> str:
    """calls/s answered, p50 / p99 ms of them; calls/s without an answer, their p50 ms."""
    seconds = run["seconds"]
    return (
        f"{run['completed'] / seconds:,.0f} | {_ms(run['p50_us'])} / {_ms(run['p99_us'])} | "
        f"{run['refused'] / seconds:,.0f} ({_ms(run['refused_p50_us'])})"
    )


def render(result: dict[str, Any]) -> str:
    names = dict(TRANSPORTS)
    lines = [
        "| transport | load | calls/s answered | p50 / p99 ms of those | calls/s refused or "
        "expired (their p50 ms) | server CPU µs/call |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for transport, phases in result["cache_hit"].items():
        sat = phases["saturation"]
        rows = [
            ("cache hits, 64 in flight (saturation)", sat),
            ("cache hits, 400 in flight, 100 ms deadlines", phases["crowded"]),
            (
                f"cache hits, open loop at 2× ({phases['doubled']['offered_rate']:,.0f}/s), "
                "100 ms deadlines",
                phases["doubled"],
            ),
            (f"probe {PROBE_RATE:,.0f}/s alone", phases["probe_quiet"]),
            (
                f"probe {PROBE_RATE:,.0f}/s beside 1 000 unfinished calls",
                phases["probe_abused"],
            ),
        ]
        for load, run in rows:
            cpu = run.get("server_cpu_us_per_call") if run is sat else None
            lines.append(
                f"| {names[transport]} | {load} | {_answered(run)} | "
                f"{'—' if cpu is None else f'{cpu:.0f}'} |"
            )
    for transport, phases in result["slow_database"].items():
        sat, doubled = phases["saturation"], phases["doubled"]
        lines.append(
            f"| {names[transport]} | slow database (+10 ms a query), 64 in flight | "
            f"{_answered(sat)} | {sat.get('server_cpu_us_per_call') or 0:.0f} |"
        )
        lines.append(
            f"| {names[transport]} | slow database, open loop at 2× "
            f"({doubled['offered_rate']:,.0f}/s), 100 ms deadlines | {_answered(doubled)} | — |"
        )
    if result["slow_skipped"]:
        lines.append(f"\nSlow database: skipped ({result['slow_skipped']}).")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench overload", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured, per phase (3)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument("--postgres-url", default=fixtures.DEFAULT_POSTGRES)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    load = pinned_load(
        warmup=1.0, seconds=args.seconds, latency_seconds=args.seconds, pin=not args.no_pin
    )
    with tempfile.TemporaryDirectory(prefix="apikeys-overload-") as temporary:
        try:
            result = run(load, Path(temporary), None if args.no_postgres else args.postgres_url)
        except RuntimeError:
            log = Path(temporary) / "server.log"
            if log.exists():
                sys.stderr.write(log.read_text(errors="replace")[-3000:])
            raise
    table = render(result)
    print(table)
    if not args.no_markdown:
        command = "python -m bench overload" + (f" {' '.join(argv)}" if argv else "")
        body = f"Last run: {sections.machine_line()}; `{command}`.\n\n{table}\n"
        sections.write(args.markdown, "overload", body)
    return 0
