"""``python -m bench tripwire``: Verify cache hits of valid keys vs. a flood of one revoked key.

One server (bench.server_main, SQLite, every call a cache hit) answers both, alternately over
the rounds: valid keys round robin, then one revoked key on every call, whose each answer trips
the tripwire (a presentation counted in memory, flushed every second with its event). Reported
per workload: saturation throughput and the server's CPU per call (all its threads: the flush
thread included), and at the end what the tripwire wrote. No goal: the figures are read
side by side (issue 10: "Verify throughput unaffected within noise").
"""

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any

from sqlalchemy import func, insert, select

from apikeys_server.domain.records import EventAction
from apikeys_server.storage.database import open_database
from apikeys_server.storage.models import api_keys, key_events
from apikeys_server.storage.repository import key_row
from bench import fixtures, sections, workloads
from bench.runner import (
    ROOT,
    Load,
    Measurement,
    Scenario,
    ServerProcess,
    measure,
    pinned_load,
    sample,
)

WORKING_SET = 1000
FLUSH_SECONDS = 1.0
VALID = "valid keys"
REVOKED = "one revoked key (flood)"


def _prepare(directory: Path) -> tuple[fixtures.BenchDatabase, fixtures.BenchKey]:
    database = fixtures.prepare(fixtures.sqlite_url(directory, "tripwire.db"), WORKING_SET)
    now = datetime.now(UTC)
    key = fixtures.new_key("bench-revoked", now)
    key = replace(key, record=replace(key.record, revoke_time=now, revoke_reason="bench"))
    opened = open_database(database.url, pool_size=1)
    try:
        with opened.write_engine.begin() as connection:
            connection.execute(insert(api_keys), key_row(key.record))
    finally:
        opened.dispose()
    return database, key


def _tripwire_written(url: str, key_id: str) -> tuple[int, int]:
    """The revoked key's presentation count and its PRESENTED_AFTER_REVOCATION events."""
    opened = open_database(url, pool_size=1)
    try:
        with opened.read_engine.connect() as connection:
            count = connection.execute(
                select(api_keys.c.presented_after_revocation_count).where(api_keys.c.id == key_id)
            ).scalar_one()
            events = connection.execute(
                select(func.count()).where(
                    key_events.c.key_id == key_id,
                    key_events.c.action == EventAction.PRESENTED_AFTER_REVOCATION.value,
                )
            ).scalar_one()
    finally:
        opened.dispose()
    return int(count), int(events)


def run(load: Load, rounds: int, directory: Path) -> dict[str, Any]:
    database, key = _prepare(directory)
    env = {
        "APIKEYS_DATABASE_URL": database.url,
        "APIKEYS_CACHE_TTL_SECONDS": "3600",  # every call hits
        "APIKEYS_LAST_USED_FLUSH_SECONDS": str(FLUSH_SECONDS),
    }
    position = database.feed_position
    scenarios = [
        Scenario(VALID, "verify", env, workloads.valid(database.caller, database.keys, position)),
        Scenario(REVOKED, "verify", env, workloads.revoked(database.caller, key, position)),
    ]
    done: list[Measurement] = []
    with open(directory / "server.log", "ab") as log:
        server = ServerProcess("verify", env, load.server_core, log)
        try:
            # Every key cached first, so that a short warm-up does not leave misses in the
            # first measurement; also a first check of every answer.
            for scenario in scenarios:
                wrong = sample(server.port, database.caller, scenario.workload.make(0))
                if wrong:
                    raise RuntimeError(f"{scenario.name}: {wrong[0]} ({len(wrong)} wrong)")
            for number in range(1, rounds + 1):
                for scenario in scenarios:
                    measurement = measure(scenario, "SQLite", load, None, log, server=server)
                    done.append(measurement)
                    sat = measurement.saturation
                    print(
                        f"[bench] round {number} {scenario.name}: {sat['throughput']:,.0f} "
                        f"calls/s, server {sat['server_cpu_us_per_call'] or 0:.0f} µs CPU/call, "
                        f"answers {'ok' if measurement.answers_ok else 'WRONG'}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            server.stop()  # the last flush of the tripwire happens here
    count, events = _tripwire_written(database.url, key.record.id)
    rows = []
    for scenario in scenarios:
        runs = [m for m in done if m.scenario == scenario.name]
        rows.append(
            {
                "scenario": scenario.name,
                "throughput": mean(m.saturation["throughput"] for m in runs),
                "cpu_us_per_call": mean(m.saturation["server_cpu_us_per_call"] or 0 for m in runs),
                "p50_us": mean(m.saturation["p50_us"] or 0 for m in runs),
                "p99_us": mean(m.saturation["p99_us"] or 0 for m in runs),
                "calls": sum(m.saturation["completed"] for m in runs),
                "per_round": [round(m.saturation["throughput"]) for m in runs],
                "answers_ok": all(m.answers_ok for m in runs),
            }
        )
    flood_calls = rows[1]["calls"]
    return {
        "rows": rows,
        "rounds": rounds,
        "seconds": load.seconds,
        "connections": load.connections,
        "depth": load.depth,
        "pinned": load.server_core is not None,
        "presented_count": count,
        "presented_events": events,
        # Warm-ups and answer samples are presented too: at least the measured calls.
        "count_covers_calls": count >= flood_calls,
        "answers_ok": all(row["answers_ok"] for row in rows),
    }


def render(result: dict[str, Any]) -> tuple[str, list[str]]:
    rows = result["rows"]
    base_throughput = rows[0]["throughput"] or float("nan")
    lines = [
        "| workload (cache hit, SQLite) | calls/s | vs valid | server CPU µs/call | "
        "p50 µs | p99 µs | calls measured | calls/s per round |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {row['throughput']:,.0f} | "
            f"{row['throughput'] / base_throughput:.2f} | {row['cpu_us_per_call']:.0f} | "
            f"{row['p50_us']:,.0f} | {row['p99_us']:,.0f} | {row['calls']:,} | "
            f"{', '.join(f'{value:,}' for value in row['per_round'])} |"
        )
    checks = [
        f"answers: {'all right' if result['answers_ok'] else 'WRONG'} (each compared byte for "
        "byte with the expected VerifyResponse)",
        f"the tripwire wrote a count of {result['presented_count']:,} presentations "
        f"({'at least' if result['count_covers_calls'] else 'FEWER than'} the "
        f"{rows[1]['calls']:,} measured calls; warm-ups and samples count too) and "
        f"{result['presented_events']} PRESENTED_AFTER_REVOCATION event(s)",
    ]
    return "\n".join(lines), checks


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench tripwire", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="alternations (3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured, per run (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="per run (1)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--depth", type=int, default=16, help="calls in flight per connection")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m bench tripwire" + (f" {' '.join(argv)}" if argv else "")
    load = pinned_load(
        warmup=args.warmup,
        seconds=args.seconds,
        connections=args.connections,
        depth=args.depth,
        pin=not args.no_pin,
    )
    cores = os.sched_getaffinity(0)
    if load.generator_core is not None:
        os.sched_setaffinity(0, {load.generator_core})  # keep this harness off the server's core
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="apikeys-tripwire-") as temporary:
            result = run(load, max(1, args.rounds), Path(temporary))
    finally:
        os.sched_setaffinity(0, cores)  # the machine line counts the usable cores
    table, checks = render(result)
    print(table)
    print()
    print("\n".join(checks))
    if not args.no_markdown:
        placement = (
            "server and load generator pinned to one core each"
            if load.server_core is not None
            else "not pinned"
        )
        body = (
            f"Command: `{command}` (about {time.monotonic() - started:.0f} s). Run "
            f"{sections.machine_line()}. One `bench.server_main verify` process ({placement}), "
            f"{WORKING_SET} valid keys, cache TTL 1 h (every call a hit), tripwire and last-used "
            f"flushed every {FLUSH_SECONDS:g} s; {load.connections} connections x "
            f"{load.depth} in flight, {load.seconds:g} s measured after {load.warmup:g} s "
            f"warm-up, the two workloads alternating over {result['rounds']} rounds.\n\n"
            f"{table}\n\n" + "\n".join(f"- {line}" for line in checks)
        )
        sections.write(args.markdown, "tripwire", body)
        print(f"wrote {args.markdown}")
    print(f"{time.monotonic() - started:.0f} s in all", file=sys.stderr)
    return 0 if result["answers_ok"] and result["count_covers_calls"] else 1
