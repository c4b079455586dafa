"""``python -m bench.metrics_overhead``: cache-hit Verify server CPU with /metrics off and on.

The "cache hit" scenario of ``python -m bench`` (same fixtures, workload, load generator and
pinning), run on two servers that differ only in ``APIKEYS_METRICS_LISTEN``, interleaved over
rounds (off, on, on, off, ...) so drift hits both alike. While the metrics server is measured
nothing scrapes it: the figure is what recording costs on the call path. Prints the server CPU
per call (h2gen's reading of /proc for the server process) and the ratio on / off.
"""

import argparse
import statistics
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

from bench import fixtures, workloads
from bench.runner import Scenario, measure, pinned_load


def recording_cost(calls: int = 200_000) -> tuple[float, float]:
    """µs a call of what metrics add to a cache-hit Verify, timed alone in this process
    (steadier than the servers' CPU on a busy machine): the handler wrapper's observe with a
    trivial handler, minus that handler bare; and the Verify answer's count."""
    from apikeys_server.config import Settings
    from apikeys_server.metrics import Metrics
    from apikeys_server.rpc.registration import observed

    class Context:
        def code(self) -> None:
            return None

    def handler(request: int, _context: Context) -> int:
        return request

    made = Metrics(Settings(metrics_listen="127.0.0.1:0"))
    wrapped = observed(handler, made.observer("apikeys.v1.KeyVerifier", "Verify", "unary"), False)
    context = Context()

    def best(function: Callable[[], object]) -> float:
        return min(timeit.repeat(function, number=calls, repeat=7)) / calls * 1e6

    bare = best(lambda: handler(1, context))
    return best(lambda: wrapped(1, context)) - bare, best(lambda: made.count_verify(1)) - bare


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_overhead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--working-set", type=int, default=1000)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    observe, count = recording_cost()
    print(f"recording alone: observe {observe:.2f} µs + verify count {count:.2f} µs a call")
    load = pinned_load(warmup=args.warmup, seconds=args.seconds, pin=not args.no_pin)
    results: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as directory:
        small = fixtures.prepare(fixtures.sqlite_url(Path(directory), "small.db"), args.working_set)
        hits = {"APIKEYS_DATABASE_URL": small.url, "APIKEYS_CACHE_TTL_SECONDS": "3600"}
        scenarios = {
            "off": Scenario(
                "cache hit, metrics off",
                "verify",
                hits,
                workloads.valid(small.caller, small.keys, small.feed_position),
            ),
            "on": Scenario(
                "cache hit, metrics on",
                "verify",
                {**hits, "APIKEYS_METRICS_LISTEN": "127.0.0.1:0"},
                workloads.valid(small.caller, small.keys, small.feed_position),
            ),
        }
        with (Path(directory) / "servers.log").open("wb") as log:
            for round_number in range(args.rounds):
                order = ("off", "on") if round_number % 2 == 0 else ("on", "off")
                for name in order:
                    result = measure(scenarios[name], "SQLite", load, None, log)
                    if not result.answers_ok:
                        print(f"{name}: wrong answers {result.sample_errors}", file=sys.stderr)
                        return 1
                    cpu = result.saturation["server_cpu_us_per_call"]
                    results[name].append(cpu)
                    print(
                        f"round {round_number + 1} metrics {name:3}: "
                        f"{cpu:.2f} µs server CPU per call, "
                        f"{result.saturation['throughput']:.0f} calls/s",
                        flush=True,
                    )
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(
        f"median server CPU per cache-hit Verify: off {off:.2f} µs, on {on:.2f} µs, "
        f"ratio {on / off:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
