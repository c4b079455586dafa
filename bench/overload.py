"""``python -m bench overload``: the transport under overload and under abuse, before vs after.

Both transports serve the same Verify cache hits (SQLite, 1 000 keys, every call a hit), one
server process each, pinned like ``make bench``: gRPC's own thread pool (``BENCH_TRANSPORT=
stock``, the server before rpc/dispatch.py) and the dispatcher (what ships). For each:

1. **Saturation**: closed loop, 4 connections × 16 calls in flight: calls/s and server CPU/call.
2. **2× overload**: open loop at twice that transport's own saturation rate, every call with a
   100 ms deadline: the answered calls/s and the p50/p99 of answered calls; calls answered
   without a message (refused with RESOURCE_EXHAUSTED, or expired) counted apart, with their
   p50 — a refusal at once shows as a short one.
3. **Unfinished streams**: a probe of 500 Verify calls/s (1 s deadline) alone, then while a
   client holds 1 000 calls whose bodies never finish, over 10 connections: the probe's p50/p99
   and how many it got no answer for.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import fixtures, proc, sections, workloads
from bench.runner import ROOT, Load, ServerProcess, run_h2gen, sample
from bench.unfinished import UnfinishedStreams
from bench.workloads import VERIFY_PATH

TRANSPORTS = (("stock", "gRPC's own pool (before)"), ("dispatch", "dispatcher (now)"))
DEADLINE_MS = 100
PROBE_RATE = 500.0
PROBE_DEADLINE_MS = 1000


def _transport(load: Load, database: fixtures.BenchDatabase, transport: str) -> dict[str, Any]:
    env = {
        "APIKEYS_DATABASE_URL": database.url,
        "APIKEYS_CACHE_TTL_SECONDS": "3600",
        "BENCH_TRANSPORT": transport,
    }
    calls = workloads.valid(database.caller, database.keys, database.feed_position).make(0)
    caller = database.caller
    with open(os.devnull, "wb") as log:
        server = ServerProcess("verify", env, load.server_core, log)
        try:
            wrong = sample(server.port, caller, calls[:20])
            if wrong:
                raise RuntimeError(f"{transport}: {wrong[0]}")
            saturation = run_h2gen(server.port, server.pid, caller, calls, load, None)
            rate = 2 * saturation["throughput"]
            overload = run_h2gen(
                server.port,
                server.pid,
                caller,
                calls,
                replace(load, warmup=0.5),
                rate,
                deadline_ms=DEADLINE_MS,
                depth=100_000,
            )
            probe_load = replace(load, warmup=0.2, latency_seconds=3.0, connections=1)
            quiet = run_h2gen(
                server.port,
                server.pid,
                caller,
                calls,
                probe_load,
                PROBE_RATE,
                deadline_ms=PROBE_DEADLINE_MS,
                depth=10_000,
            )
            with UnfinishedStreams(server.port, VERIFY_PATH, connections=10, streams=100):
                time.sleep(0.5)
                abused = run_h2gen(
                    server.port,
                    server.pid,
                    caller,
                    calls,
                    probe_load,
                    PROBE_RATE,
                    deadline_ms=PROBE_DEADLINE_MS,
                    depth=10_000,
                )
        finally:
            server.stop()
    return {
        "transport": transport,
        "saturation": saturation,
        "overload": overload,
        "probe_quiet": quiet,
        "probe_abused": abused,
    }


def run(load: Load, directory: Path) -> dict[str, Any]:
    database = fixtures.prepare(fixtures.sqlite_url(directory, "overload.db"), 1000)
    results = []
    for transport, _ in TRANSPORTS:
        results.append(_transport(load, database, transport))
        sat = results[-1]["saturation"]
        print(
            f"[bench] {transport}: {sat['throughput']:,.0f} calls/s, "
            f"{sat['server_cpu_us_per_call'] or 0:.0f} µs CPU/call",
            file=sys.stderr,
            flush=True,
        )
    return {"transports": results}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value / 1000:,.1f}"


def render(result: dict[str, Any]) -> str:
    names = dict(TRANSPORTS)
    lines = [
        "| transport | saturation calls/s | server CPU µs/call | at 2× (100 ms deadline): "
        "answered calls/s | answered p50 / p99 ms | no answer: calls/s, p50 ms | "
        "probe alone p50 / p99 ms | probe beside 1 000 unfinished calls p50 / p99 ms, "
        "no answer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["transports"]:
        sat, over = row["saturation"], row["overload"]
        quiet, abused = row["probe_quiet"], row["probe_abused"]
        seconds = over["seconds"]
        lines.append(
            f"| {names[row['transport']]} | {sat['throughput']:,.0f} | "
            f"{sat['server_cpu_us_per_call'] or 0:.0f} | {over['completed'] / seconds:,.0f} "
            f"(offered {over['offered_rate']:,.0f}) | {_ms(over['p50_us'])} / "
            f"{_ms(over['p99_us'])} | {over['refused'] / seconds:,.0f}, "
            f"{_ms(over['refused_p50_us'])} | {_ms(quiet['p50_us'])} / {_ms(quiet['p99_us'])} | "
            f"{_ms(abused['p50_us'])} / {_ms(abused['p99_us'])}, {abused['refused']:,} of "
            f"{abused['refused'] + abused['completed']:,} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench overload", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured, per phase (3)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    usable = proc.cores()
    pin = not args.no_pin and len(usable) >= 2 and shutil.which("taskset") is not None
    load = Load(
        warmup=1.0,
        seconds=args.seconds,
        latency_seconds=args.seconds,
        connections=4,
        depth=16,
        server_core=usable[0] if pin else None,
        generator_core=usable[1] if pin else None,
        h2load=None,
    )
    with tempfile.TemporaryDirectory(prefix="apikeys-overload-") as temporary:
        result = run(load, Path(temporary))
    table = render(result)
    print(table)
    if not args.no_markdown:
        command = "python -m bench overload" + (f" {' '.join(argv)}" if argv else "")
        body = f"Last run: {sections.machine_line()}; `{command}`.\n\n{table}\n"
        sections.write(args.markdown, "overload", body)
    return 0
