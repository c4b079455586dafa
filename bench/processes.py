"""``python -m bench --processes-compare``: Verify cache hits on ``serve --processes 1`` and ``2``.

The real ``apikeys-server serve`` command (not bench.server_main: the workers are forked by the
server itself), the same load generator and load for both, interleaved over rounds. The servers
may use the same cores (``taskset``); the generator runs on its own core when there is one to
spare beyond the servers', else on one of theirs, and the report says which.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import fixtures, proc, workloads
from bench.runner import ROOT, Load, run_h2gen, sample

COUNTS = (1, 2)
# Many connections, so SO_REUSEPORT's hash spreads them over the workers evenly enough.
CONNECTIONS = 16
DEPTH = 4
START_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Placement:
    server_cores: list[int] | None
    generator_core: int | None

    def describe(self) -> str:
        if self.server_cores is None:
            return "not pinned"
        shared = self.generator_core in self.server_cores
        return (
            f"servers on cores {','.join(map(str, self.server_cores))}, load generator on core "
            f"{self.generator_core}{' (shared with the servers)' if shared else ''}"
        )


def placement(pin: bool) -> Placement:
    usable = proc.cores()
    if not pin or len(usable) < 2 or shutil.which("taskset") is None:
        return Placement(None, None)
    generator = usable[-1]
    spare = [core for core in usable if core != generator]
    # Two server processes need two cores to show anything; share the generator's if short.
    return Placement(spare if len(spare) >= max(COUNTS) else usable, generator)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


class ServeProcess:
    """``apikeys-server serve --processes N`` on a fixed port, stopped with SIGTERM.

    ``env``: more APIKEYS_* settings (over the cache TTL of an hour set here)."""

    def __init__(
        self,
        count: int,
        url: str,
        where: Placement,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.count = count
        self.port = _free_port()
        command = [sys.executable, "-m", "apikeys_server", "serve", "--processes", str(count)]
        if where.server_cores is not None:
            command = ["taskset", "-c", ",".join(map(str, where.server_cores)), *command]
        environment = {k: v for k, v in os.environ.items() if k[:8] != "APIKEYS_"}
        environment.update(
            {
                "APIKEYS_DATABASE_URL": url,
                "APIKEYS_LISTEN": f"127.0.0.1:{self.port}",
                "APIKEYS_CACHE_TTL_SECONDS": "3600",  # every call hits
            }
        )
        environment.update(env or {})
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=environment, stdin=subprocess.DEVNULL, stderr=log, stdout=log
            )
        self._wait_ready(time.monotonic() + START_TIMEOUT_SECONDS)

    def pids(self) -> list[int]:
        """The processes that serve: the workers, or the process itself when it is alone."""
        return [self.process.pid] if self.count == 1 else _children(self.process.pid)

    def _wait_ready(self, deadline: float) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and self.process.poll() is None:
                log = self.log_path.read_text(errors="replace")
                workers = self.pids()
                ready = self.count == 1 or (
                    len(workers) == self.count
                    and all(f"worker {pid} serving" in log for pid in workers)
                )
                try:
                    answer = stub.Check(request, timeout=0.25, wait_for_ready=True)
                except grpc.RpcError:
                    continue
                if ready and answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"serve --processes {self.count} did not start: see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure_once(
    count: int, database: fixtures.BenchDatabase, load: Load, where: Placement, log_path: Path
) -> dict[str, Any]:
    server = ServeProcess(count, database.url, where, log_path)
    try:
        workload = workloads.valid(database.caller, database.keys, database.feed_position)
        checks = workload.make(20)
        errors = sample(server.port, workload.caller, checks)
        pids = server.pids()
        before = [proc.cpu_seconds(pid) for pid in pids]
        calls = workload.make(int(60_000 * (load.warmup + load.seconds)))
        result = run_h2gen(server.port, 0, workload.caller, calls, load, None)
        spent = [proc.cpu_seconds(pid) - start for pid, start in zip(pids, before, strict=True)]
        errors += sample(server.port, workload.caller, checks)
    finally:
        server.stop()
    return {
        "processes": count,
        "throughput": result["throughput"],
        "p50_us": result["p50_us"],
        "p99_us": result["p99_us"],
        "wrong": result["wrong"] + result["reset"] + len(errors),
        # CPU seconds of each serving process over warm-up and measurement: how evenly the
        # kernel spread the connections.
        "cpu_s_per_process": [round(seconds, 2) for seconds in spent],
        "exit_status": server.process.returncode,
    }


def compare(
    load: Load, rounds: int, pin: bool, directory: Path, working_set: int
) -> dict[str, Any]:
    where = placement(pin)
    load = replace(
        load,
        connections=CONNECTIONS,
        depth=DEPTH,
        generator_core=where.generator_core,
        server_core=None,
        h2load=None,
    )
    database = fixtures.prepare(fixtures.sqlite_url(directory, "processes.db"), working_set)
    log_path = directory / "processes.log"
    runs = []
    for number in range(1, rounds + 1):
        for count in COUNTS:
            run = measure_once(count, database, load, where, log_path)
            run["round"] = number
            runs.append(run)
            print(
                f"[bench] round {number} --processes {count}: {run['throughput']:,.0f} calls/s, "
                f"CPU s per process {run['cpu_s_per_process']}, wrong {run['wrong']}",
                file=sys.stderr,
                flush=True,
            )
    means = {
        count: sum(r["throughput"] for r in runs if r["processes"] == count) / rounds
        for count in COUNTS
    }
    return {
        "placement": where.describe(),
        "cores": len(proc.cores()),
        "connections": CONNECTIONS,
        "depth": DEPTH,
        "seconds": load.seconds,
        "runs": runs,
        "mean_throughput": means,
        "speedup": means[2] / means[1] if means[1] else None,
        "answers_ok": all(r["wrong"] == 0 and r["exit_status"] == 0 for r in runs),
    }


def render(result: dict[str, Any]) -> str:
    means = result["mean_throughput"]
    lines = [
        f"Verify cache hit, serve --processes 1 vs 2 ({result['cores']} cores; "
        f"{result['placement']}; {result['connections']} connections x {result['depth']} "
        f"in flight, {result['seconds']:.1f} s per run)",
    ]
    for run in result["runs"]:
        lines.append(
            f"  round {run['round']}, {run['processes']} process(es): "
            f"{run['throughput']:>9,.0f} calls/s  p50 {run['p50_us'] or 0:,.0f} µs  "
            f"p99 {run['p99_us'] or 0:,.0f} µs  CPU s per process {run['cpu_s_per_process']}"
        )
    lines.append(
        f"  mean: {means[1]:,.0f} vs {means[2]:,.0f} calls/s "
        f"(x {result['speedup'] or 0:.2f}); answers {'ok' if result['answers_ok'] else 'WRONG'}"
    )
    return "\n".join(lines)
