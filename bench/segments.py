"""Where a Verify call's CPU goes, measured inside the real server: ``python -m bench.segments``.

While the load generator saturates a pinned server, parts of the Verify path are timed with
their thread's CPU clock (see ``bench.server_main.SEGMENTS``). Each server run times one group
of parts that do not nest, so no figure contains another part's timers; the handler's own
total comes from a run that times nothing else. Figures are µs of CPU per Verify call (a part
called twice a call, like the key check for the caller and for the presented key, counts
both), each with some 0.5-1 µs of the timing itself in it. The first column is the
authenticated echo's handler (bench/echo.py), the least any authenticated Verify must do,
timed the same way. Not part of ``make bench``: the timers cost about what they measure.
"""

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import fixtures, workloads
from bench.runner import Load, ServerProcess, pinned_load, run_h2gen
from bench.workloads import Workload

# Parts that do not nest go in the same run (bench.server_main.SEGMENTS names them):
# the handler calls caller_key, authenticate, verify, verify_response; verify calls check;
# authenticate and check call the leaves: digest, cache_read (the cache alone, asked first),
# and on a miss is_well_formed and cache_load (the miss counted), which calls store_lookup
# and cache_put.
GROUPS: tuple[tuple[str, ...], ...] = (
    (),
    ("caller_key", "authenticate", "verify", "verify_response"),
    ("check",),
    ("is_well_formed", "digest", "cache_read", "last_used", "clock"),
    ("cache_load",),
    ("store_lookup", "cache_put"),
)
# The reference: the authenticated echo's handler (bench/echo.py), timed the same way.
REFERENCE = "authenticated echo"


def _scenarios(db: fixtures.BenchDatabase) -> dict[str, tuple[dict[str, str], Workload]]:
    hits = {"APIKEYS_DATABASE_URL": db.url, "APIKEYS_CACHE_TTL_SECONDS": "3600"}
    return {
        REFERENCE: ({"APIKEYS_DATABASE_URL": db.url}, workloads.echo(db.caller, db.keys)),
        "cache hit": (hits, workloads.valid(db.caller, db.keys, db.feed_position)),
        "malformed key": (hits, workloads.malformed(db.caller, len(db.keys))),
        "cache miss, SQLite": (
            {"APIKEYS_DATABASE_URL": db.url, "APIKEYS_CACHE_SIZE": str(len(db.keys) // 10)},
            workloads.valid(db.caller, db.keys, db.feed_position),
        ),
    }


def measure(
    env: dict[str, str], workload: Workload, load: Load, log_path: Path, mode: str = "verify"
) -> dict[str, tuple[float, float]]:
    """name -> (µs per Verify call, calls per Verify call); "handler" is the whole handler.
    ``mode`` "echo-auth": the authenticated echo's handler alone."""
    found: dict[str, tuple[float, float]] = {}
    calls = workload.make(0)
    with open(log_path, "ab") as log:
        for group in GROUPS if mode == "verify" else ((),):
            server = ServerProcess(
                mode, {**env, "BENCH_SEGMENTS": ",".join(group)}, load.server_core, log
            )
            try:
                run_h2gen(server.port, server.pid, workload.caller, calls, load, None)
            finally:
                spent, handled = server.stop()
            if not handled:
                raise RuntimeError("the server answered no call")
            if not group:
                found["handler"] = (spent / handled / 1000, 1.0)
            for name, (part, count) in server.segments.items():
                found[name] = (part / handled / 1000, count / handled)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.segments", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--working-set", type=int, default=1000)
    args = parser.parse_args(argv)
    load = pinned_load(warmup=1.0, seconds=args.seconds)
    if load.generator_core is not None:
        os.sched_setaffinity(0, {load.generator_core})
    with tempfile.TemporaryDirectory(prefix="apikeys-segments-") as temporary:
        directory = Path(temporary)
        db = fixtures.prepare(fixtures.sqlite_url(directory, "segments.db"), args.working_set)
        results = {}
        for name, (env, workload) in _scenarios(db).items():
            print(f"[segments] {name}", file=sys.stderr, flush=True)
            mode = "echo-auth" if name == REFERENCE else "verify"
            results[name] = measure(env, workload, load, directory / "servers.log", mode)
    names = ["handler"] + [part for group in GROUPS for part in group]
    header = ["part of Verify", *(f"{scenario} µs (×/call)" for scenario in results)]
    rows = [header]
    for part in names:
        cells = [part]
        for figures in results.values():
            value = figures.get(part)
            cells.append(
                "—" if value is None or value[1] == 0 else f"{value[0]:.1f} (×{value[1]:.2g})"
            )
        rows.append(cells)
    print("| " + " | ".join(rows[0]) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
