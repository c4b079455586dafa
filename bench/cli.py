"""``python -m bench``: prepare the databases, run the scenarios interleaved, report."""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import (
    faults,
    fixtures,
    overload,
    processes,
    propagation,
    report,
    tripwire,
    workloads,
)
from bench.runner import (
    ROOT,
    Load,
    Measurement,
    Scenario,
    ServerProcess,
    find_h2load,
    measure,
    pinned_load,
)

DEFAULT_POSTGRES = fixtures.DEFAULT_POSTGRES


@dataclass(frozen=True)
class Options:
    smoke: bool
    rounds: int
    load: Load
    working_set: int
    big: int
    rss_keys: int
    postgres_url: str | None
    json_path: Path | None
    markdown_path: Path | None
    gc: str
    # A tree holding an earlier revision's server/ and client/: twin rows served by its code.
    before: Path | None = None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny, SQLite only, checks")
    parser.add_argument("--rounds", type=int, help="times to run the interleaved sequence (2)")
    parser.add_argument("--seconds", type=float, help="measured seconds at saturation (3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds (1)")
    parser.add_argument("--latency-seconds", type=float, help="seconds at fixed load (2)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--depth", type=int, default=16, help="calls in flight per connection")
    parser.add_argument("--working-set", type=int, help="valid keys cycled through (1000)")
    parser.add_argument("--big", type=int, help="rows of the big database (1000000; 0: skip)")
    parser.add_argument("--rss-keys", type=int, help="keys cached for the memory figure (100000)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("APIKEYS_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="admin URL; a fresh database is created there and dropped (default: %(default)s)",
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--no-h2load", action="store_true", help="skip the h2load cross-check (first round)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument(
        "--gc",
        choices=("serve", "collect", "off"),
        default="serve",
        help="garbage collector of every server after start-up: as `serve` runs (gc.freeze()), "
        "Python's default (collect), or disabled (off)",
    )
    parser.add_argument(
        "--processes-compare",
        action="store_true",
        help="only this: Verify cache hits on `serve --processes 1` vs `--processes 2`, "
        "same load generator and load (make bench-processes)",
    )
    parser.add_argument(
        "--rss-only",
        action="store_true",
        help="only the memory figure (--rss-keys cached keys; about a minute); writes nothing",
    )
    parser.add_argument(
        "--before",
        metavar="REV",
        help="also serve the hit, malformed, negative-cache and SQLite-miss rows with the server "
        "code of git revision REV, each right after its own: before/after from one run",
    )
    parser.add_argument("--json", type=Path, help="default: bench/results/latest.json")
    parser.add_argument("--markdown", type=Path, help="default: BENCHMARKS.md (never in smoke)")
    return parser


def _options(args: argparse.Namespace) -> Options:
    smoke = bool(args.smoke)
    h2load = None if (smoke or args.no_h2load) else find_h2load()

    def pick(value: float | None, full: float, quick: float) -> float:
        return value if value is not None else (quick if smoke else full)

    load = pinned_load(
        warmup=pick(args.warmup, 1.0, 0.1),
        seconds=pick(args.seconds, 3.0, 0.3),
        latency_seconds=pick(args.latency_seconds, 2.0, 0.2),
        connections=args.connections,
        depth=args.depth,
        h2load=h2load,
        pin=not args.no_pin,
    )
    working_set = int(pick(args.working_set, 1000, 50))
    big = int(pick(args.big, 1_000_000, 0))
    json_path = args.json
    if json_path is None and not smoke:
        json_path = ROOT / "bench" / "results" / "latest.json"
    markdown = None if smoke else (args.markdown or ROOT / "BENCHMARKS.md")
    return Options(
        smoke=smoke,
        rounds=max(1, int(pick(args.rounds, 2, 1))),
        load=load,
        working_set=working_set,
        big=big,
        rss_keys=int(pick(args.rss_keys, 100_000, 2_000)),
        postgres_url=None if (smoke or args.no_postgres) else args.postgres_url,
        json_path=json_path,
        markdown_path=markdown,
        gc=args.gc,
    )


@dataclass(frozen=True)
class Databases:
    small: fixtures.BenchDatabase
    big: fixtures.BenchDatabase | None
    postgres: fixtures.BenchDatabase | None
    postgres_skipped: str


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextmanager
def _databases(options: Options, directory: Path) -> Iterator[Databases]:
    with ExitStack() as stack:
        started = time.monotonic()
        small = fixtures.prepare(fixtures.sqlite_url(directory, "small.db"), options.working_set)
        _say(f"SQLite, {small.rows:,} keys: ready in {time.monotonic() - started:.1f} s")
        big = None
        if options.big:
            started = time.monotonic()
            filler = max(0, options.big - options.working_set - 1)
            big = fixtures.prepare(
                fixtures.sqlite_url(directory, "big.db"), options.working_set, filler
            )
            _say(f"SQLite, {big.rows:,} keys: ready in {time.monotonic() - started:.1f} s")
        postgres, skipped = None, ""
        if options.postgres_url:
            try:
                url = stack.enter_context(fixtures.postgres_database(options.postgres_url))
                postgres = fixtures.prepare(url, options.working_set)
                _say(f"PostgreSQL, {postgres.rows:,} keys: ready")
            except Exception as error:  # reported; the rest still runs
                skipped = str(error).splitlines()[0]
                _say(f"PostgreSQL skipped: {skipped}")
        else:
            skipped = "not asked for"
        yield Databases(small, big, postgres, skipped)


def _scenarios(options: Options, dbs: Databases) -> list[tuple[Scenario, str]]:
    """The sequence of a round, both ceilings (echo, authenticated echo) first and last; each
    with the database it runs on.

    The positive cache TTL is raised to an hour except for the misses, so that "cache hit"
    means every call hits (with the default 1 s a key is fetched again once a second).
    """
    small, caller = dbs.small, dbs.small.caller
    hits = {"APIKEYS_DATABASE_URL": small.url, "APIKEYS_CACHE_TTL_SECONDS": "3600"}
    miss = {"APIKEYS_CACHE_SIZE": str(max(1, options.working_set // 10))}
    echo = Scenario(
        "echo",
        "echo",
        {},
        workloads.echo(caller, small.keys),
        note="the ceiling: same server factory and settings, constant answer",
        fixed_body=True,
    )
    authenticated = replace(
        echo,
        name="authenticated echo",
        mode="echo-auth",
        env={"APIKEYS_DATABASE_URL": small.url},
        note="the least an authenticated Verify must do: both keys hashed, looked up in a dict",
    )
    found = [
        (echo, "—"),
        (authenticated, "SQLite"),
        (
            Scenario(
                "cache hit",
                "verify",
                hits,
                workloads.valid(caller, small.keys, small.feed_position),
                note="every call hits the cache; the caller is authenticated on each",
                fixed_body=True,
            ),
            "SQLite",
        ),
        (
            Scenario(
                report.FLOOR,
                "verify-floor",
                hits,
                workloads.valid(caller, small.keys, small.feed_position),
                note="diagnostic: the same hits through bench/floor.py's inline hit path, "
                "everything a hit must do in one function",
                fixed_body=True,
            ),
            "SQLite",
        ),
        (
            Scenario(
                "malformed key",
                "verify",
                hits,
                workloads.malformed(caller, options.working_set),
                note="bad checksum: refused by the shape check, no lookup",
                fixed_body=True,
            ),
            "SQLite",
        ),
        (
            Scenario(
                "unknown key (repeated)",
                "verify",
                hits,
                workloads.unknown(caller, options.working_set, small.feed_position),
                note="well-formed keys nobody holds, again and again: the negative cache",
                fixed_body=True,
            ),
            "SQLite",
        ),
        (
            Scenario(
                "unknown key (fresh each call)",
                "verify",
                hits,
                workloads.unknown_fresh(caller, small.feed_position),
                note="a brute-force flood: every call a new well-formed key, so a lookup each",
            ),
            "SQLite",
        ),
    ]
    bound = miss["APIKEYS_CACHE_SIZE"]
    databases = [("cache miss, SQLite", small)]
    if dbs.big is not None:
        big_name = (
            "cache miss, SQLite, 1 M keys" if dbs.big.rows >= 1_000_000 else "cache miss, big"
        )
        databases.append((big_name, dbs.big))
    if dbs.postgres is not None:
        databases.append(("cache miss, PostgreSQL", dbs.postgres))
    for name, database in databases:
        kind = "PostgreSQL" if database.url.startswith("postgresql") else "SQLite"
        scenario = Scenario(
            name,
            "verify",
            {"APIKEYS_DATABASE_URL": database.url, **miss},
            workloads.valid(database.caller, database.keys, database.feed_position),
            note=f"cache bound {bound} < working set: every verified key misses, "
            "the caller's key hits",
        )
        found.append((scenario, f"{kind}, {database.rows:,} keys"))
    if options.before is not None:
        found = _with_before(found, options.before)
    if not options.smoke:
        found += [(authenticated, "SQLite"), (echo, "—")]
    if options.gc != "serve":
        found = [(replace(s, env={**s.env, "BENCH_GC": options.gc}), db) for s, db in found]
    return found


# The rows --before serves twice: with this tree's server code, then with the earlier one's.
BEFORE_ROWS = ("cache hit", "malformed key", "unknown key (repeated)", "cache miss, SQLite")


def _with_before(found: list[tuple[Scenario, str]], tree: Path) -> list[tuple[Scenario, str]]:
    """Each of BEFORE_ROWS followed by its twin "(before)", whose server process imports
    apikeys_server and the generated code from ``tree`` (its PYTHONPATH, ahead of this one's
    editable install); the harness, load and database are this run's."""
    path = os.pathsep.join(str(tree / part) for part in ("server", "client"))
    twinned: list[tuple[Scenario, str]] = []
    for scenario, database in found:
        twinned.append((scenario, database))
        if scenario.name in BEFORE_ROWS:
            twin = replace(
                scenario,
                name=f"{scenario.name} (before)",
                env={**scenario.env, "PYTHONPATH": path},
                note=f"{scenario.note}; served by the earlier revision's code",
            )
            twinned.append((twin, database))
    return twinned


@contextmanager
def _earlier_tree(revision: str | None) -> Iterator[Path | None]:
    """server/ and client/ of ``revision`` (git archive) in a temporary directory."""
    if revision is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="apikeys-before-") as temporary:
        archive = subprocess.run(
            ["git", "archive", revision, "server", "client"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", temporary], input=archive, check=True)
        yield Path(temporary)


def _run_round(options: Options, dbs: Databases, log_path: Path, number: int) -> list[Measurement]:
    """Every scenario once, in order; each on a fresh server (smoke: shared where it can)."""
    done: list[Measurement] = []
    rate: float | None = None
    max_rate = 20_000.0
    shared: ServerProcess | None = None
    load = options.load if number == 1 else replace(options.load, h2load=None)
    with open(log_path, "ab") as log:
        try:
            for scenario, database in _scenarios(options, dbs):
                log.write(f"--- round {number} {scenario.name}\n".encode())
                log.flush()
                server = None
                if options.smoke:
                    if shared is not None and shared.spec != (scenario.mode, scenario.env):
                        shared.stop()
                        shared = None
                    if shared is None:
                        shared = ServerProcess(scenario.mode, scenario.env, load.server_core, log)
                    server = shared
                if rate is None:
                    # The first echo run: half its maximum is the fixed load of every scenario.
                    measurement = measure(
                        scenario, database, load, None, log, own_half=True, server=server
                    )
                    max_rate = measurement.saturation["throughput"]
                    rate = max_rate / 2
                else:
                    measurement = measure(
                        scenario, database, load, rate, log, max_rate, server=server
                    )
                done.append(measurement)
                sat = measurement.saturation
                _say(
                    f"round {number} {scenario.name}: {sat['throughput']:,.0f} calls/s, "
                    f"server {sat.get('server_cpu_us_per_call') or 0:.0f} µs CPU/call, "
                    f"answers {'ok' if measurement.answers_ok else 'WRONG'}"
                )
        finally:
            if shared is not None:
                shared.stop()
    return done


def _rss(options: Options, directory: Path) -> dict[str, Any]:
    url = fixtures.sqlite_url(directory, "rss.db")
    fixtures.prepare(url, 0, filler=options.rss_keys + max(1, options.rss_keys // 10))
    command = [sys.executable, "-m", "bench.rss", url, str(options.rss_keys)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the memory measurement failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _compare_processes(options: Options, pin: bool, json_path: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="apikeys-bench-") as temporary:
        result = processes.compare(
            options.load, options.rounds, pin, Path(temporary), options.working_set
        )
    print(processes.render(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if result["answers_ok"] else 1


SUB_COMMANDS = ("propagation", "faults", "tripwire", "overload")


def _memory_only(options: Options) -> int:
    with tempfile.TemporaryDirectory(prefix="apikeys-bench-") as temporary:
        rss = _rss(options, Path(temporary))
    print(report.memory_line(rss))
    if not rss["within_bound"]:
        print(f"caches past their bound: {rss['sizes_after_overflow']}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if given and given[0] in SUB_COMMANDS:
        # Each sub-command has its own options.
        if given[0] == "propagation":
            return propagation.main(given[1:])
        if given[0] == "tripwire":
            return tripwire.main(given[1:])
        if given[0] == "overload":
            return overload.main(given[1:])
        return faults.main(given[1:])
    args = _parser().parse_args(argv)
    options = _options(args)
    if args.processes_compare:
        return _compare_processes(options, pin=not args.no_pin, json_path=args.json)
    if args.rss_only:
        return _memory_only(options)
    arguments = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m bench", *([shlex.join(arguments)] if arguments else [])])
    info = report.machine()
    if options.load.generator_core is not None:
        # This harness only waits during a measurement; keep it off the server's core.
        os.sched_setaffinity(0, {options.load.generator_core})
    started = time.monotonic()
    rounds: list[list[Measurement]] = []
    with (
        _earlier_tree(args.before) as before,
        tempfile.TemporaryDirectory(prefix="apikeys-bench-") as temporary,
    ):
        options = replace(options, before=before)
        directory = Path(temporary)
        log_path = directory / "servers.log"
        try:
            with _databases(options, directory) as dbs:
                rss = _rss(options, directory)
                _say(
                    f"memory: +{rss['positive_delta_bytes'] / 2**20:.1f} MB with "
                    f"{rss['keys']:,} keys cached"
                )
                for number in range(1, options.rounds + 1):
                    rounds.append(_run_round(options, dbs, log_path, number))
                skipped = dbs.postgres_skipped
        except Exception:
            if log_path.exists():
                sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
            raise
    rows = report.summarize(rounds)
    found = report.targets(rows, rss)
    lines = report.table(rows)
    print(report.render_text(lines))
    print()
    if options.smoke:
        print("smoke run: the answers were checked; its figures measure nothing")
    else:
        for target in found:
            verdict = {True: "met", False: "MISSED", None: "-"}[target.met]
            print(f"{target.what}: {target.measured} (goal {target.goal}): {verdict}")
    if skipped:
        print(f"PostgreSQL: skipped ({skipped})")
    print(f"\n{time.monotonic() - started:.0f} s in all")
    option_view = {
        "smoke": options.smoke,
        "rounds": options.rounds,
        "working_set": options.working_set,
        "big": options.big,
        "rss_keys": options.rss_keys,
        "postgres": skipped or "measured",
        "gc": options.gc,
        **{key: value for key, value in asdict(options.load).items() if key != "h2load"},
        "h2load_used": options.load.h2load is not None,
        "elapsed_s": time.monotonic() - started,
    }
    result = report.as_json(info, command, option_view, rounds, rows, found, rss)
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {options.json_path}")
    elif options.smoke:
        print(json.dumps({"rows": result["rows"], "targets": result["targets"]}))
    if options.markdown_path is not None:
        section = report.markdown_section(info, command, option_view, rows, found, rss)
        report.write_markdown(options.markdown_path, section)
        print(f"wrote {options.markdown_path}")
    wrong = [row.scenario for row in rows if not row.answers_ok]
    if wrong:
        print(f"WRONG ANSWERS in: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0
