"""Runs one scenario: a pinned server process, answers sampled, saturation, fixed load."""

import base64
import json
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from apikeys.v1 import key_verifier_pb2, key_verifier_pb2_grpc
from bench import proc
from bench.h2gen import grpc_message
from bench.workloads import VERIFY_PATH, Call, Workload

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 20


@dataclass(frozen=True)
class Load:
    """How hard and how long to push (the same for every scenario of a run)."""

    warmup: float
    seconds: float
    latency_seconds: float
    connections: int
    depth: int
    server_core: int | None
    generator_core: int | None
    h2load: str | None  # path of h2load, for the cross-check; None: skip it


def pinned_load(
    *,
    warmup: float,
    seconds: float,
    latency_seconds: float = 0.0,
    connections: int = 4,
    depth: int = 16,
    h2load: str | None = None,
    pin: bool = True,
) -> Load:
    """A Load with the server on the first usable core and the load generator on the second,
    when ``pin`` and there are two cores and ``taskset``; unpinned otherwise."""
    usable = proc.cores()
    pinned = pin and len(usable) >= 2 and shutil.which("taskset") is not None
    return Load(
        warmup=warmup,
        seconds=seconds,
        latency_seconds=latency_seconds,
        connections=connections,
        depth=depth,
        server_core=usable[0] if pinned else None,
        generator_core=usable[1] if pinned else None,
        h2load=h2load,
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str  # "echo" or "verify"
    env: dict[str, str]  # APIKEYS_* settings of the server
    workload: Workload
    note: str = ""
    fixed_body: bool = False  # h2load (one body for every call) measures the same thing


@dataclass
class Measurement:
    scenario: str
    mode: str
    database: str
    note: str
    workload: str
    saturation: dict[str, Any] = field(default_factory=dict)
    fixed_load: dict[str, Any] | None = None
    h2load: dict[str, Any] | None = None
    sampled: int = 0
    sample_errors: list[str] = field(default_factory=list)
    server_rss_bytes: int = 0
    # CPU inside the Verify handler (the rest of a call is the gRPC stack); None when shared.
    handler_us_per_call: float | None = None

    @property
    def answers_ok(self) -> bool:
        wrong = self.saturation.get("wrong", 0) + self.saturation.get("reset", 0)
        if self.fixed_load is not None:
            wrong += self.fixed_load.get("wrong", 0) + self.fixed_load.get("reset", 0)
        return not self.sample_errors and wrong == 0 and self.saturation.get("completed", 0) > 0


class ServerProcess:
    """``python -m bench.server_main MODE`` pinned to a core; stops when its stdin closes."""

    def __init__(self, mode: str, env: dict[str, str], core: int | None, log: IO[bytes]) -> None:
        self.spec = (mode, env)
        self.segments: dict[str, tuple[int, int]] = {}
        command = proc.pinned([sys.executable, "-m", "bench.server_main", mode], core)
        environment = {key: value for key, value in os.environ.items() if key[:8] != "APIKEYS_"}
        environment.update(env)
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), environment.get("PYTHONPATH")])
        )
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        self.port = self._wait_ready(deadline=time.monotonic() + 60)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self, deadline: float) -> int:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(deadline - time.monotonic()):
                    line = self.process.stdout.readline().decode()
                    match = re.fullmatch(r"READY (\d+)\s*", line)
                    if match:
                        return int(match.group(1))
                    if not line:
                        break
        self.stop()
        raise RuntimeError(f"the server did not start (exit {self.process.returncode})")

    def stop(self) -> tuple[int, int]:
        """Stops the server; returns (ns, calls) spent in its Verify handlers, if it said."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        said = ""
        try:
            if self.process.stdout is not None and not self.process.stdout.closed:
                said = self.process.stdout.read().decode()
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.segments = {
            name: (int(spent), int(calls))
            for name, spent, calls in re.findall(r"SEGMENT (\S+) (\d+) (\d+)", said)
        }
        found = re.search(r"HANDLER (\d+) (\d+)", said)
        return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def sample(port: int, caller: str, calls: list[Call]) -> list[str]:
    """Asks with a real gRPC client; returns what was wrong (nothing, when all is well)."""
    errors = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = key_verifier_pb2_grpc.KeyVerifierStub(channel)
        for body, answer in calls:
            request = key_verifier_pb2.VerifyRequest.FromString(body)
            expected = key_verifier_pb2.VerifyResponse.FromString(answer)
            try:
                got = stub.Verify(request, metadata=(("x-api-key", caller),), timeout=10)
            except grpc.RpcError as error:
                errors.append(f"{error.code().name}: {error.details()}")
                continue
            if got != expected:
                errors.append(f"expected {_brief(expected)}, got {_brief(got)}")
    return errors


def _brief(response: key_verifier_pb2.VerifyResponse) -> str:
    return f"{key_verifier_pb2.VerifyCode.Name(response.code)} key_id={response.key_id!r}"


def _spread(calls: list[Call], count: int) -> list[Call]:
    step = max(1, len(calls) // count)
    return calls[::step][:count]


def run_h2gen(
    port: int,
    server_pid: int,
    caller: str,
    calls: list[Call],
    load: Load,
    rate: float | None,
    *,
    deadline_ms: int | None = None,
    depth: int | None = None,
) -> dict[str, Any]:
    """``deadline_ms``: every call carries that deadline (``grpc-timeout``), and answers
    without a message (refused, expired) are counted apart instead of as wrong."""
    headers = [["x-api-key", caller]]
    if deadline_ms is not None:
        headers.append(["grpc-timeout", f"{deadline_ms}m"])
    plan = {
        "host": "127.0.0.1",
        "port": port,
        "path": VERIFY_PATH,
        "headers": headers,
        "refusals_ok": deadline_ms is not None,
        "requests": [
            [base64.b64encode(body).decode(), base64.b64encode(answer).decode()]
            for body, answer in calls
        ],
        "connections": load.connections,
        "depth": depth or (load.depth if rate is None else 4 * load.depth),
        "warmup": min(load.warmup, 0.5) if rate else load.warmup,
        "duration": load.latency_seconds if rate else load.seconds,
        "rate": rate,
        "server_pid": server_pid,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(plan, file)
    try:
        command = proc.pinned([sys.executable, "-m", "bench.h2gen", file.name], load.generator_core)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    finally:
        os.unlink(file.name)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_h2load(port: int, caller: str, body: bytes, load: Load) -> dict[str, Any]:
    """h2load's saturation throughput for one fixed request: an independent cross-check."""
    assert load.h2load is not None
    with tempfile.NamedTemporaryFile("wb", suffix=".bin", delete=False) as file:
        file.write(grpc_message(body))
    try:
        command = proc.pinned(
            [
                load.h2load,
                "-D",
                f"{round(load.seconds * 1000)}ms",
                "--warm-up-time",
                f"{round(load.warmup * 1000)}ms",
                "-c",
                str(load.connections),
                "-m",
                str(load.depth),
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-H",
                f"x-api-key: {caller}",
                "-d",
                file.name,
                f"http://127.0.0.1:{port}{VERIFY_PATH}",
            ],
            load.generator_core,
        )
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    finally:
        os.unlink(file.name)
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", done.stdout)
    counts = re.search(r"requests: (\d+) total.* (\d+) succeeded, (\d+) failed", done.stdout)
    if done.returncode != 0 or rate is None or counts is None:
        raise RuntimeError(f"h2load failed: {(done.stdout + done.stderr).strip()[-2000:]}")
    return {
        "generator": "h2load",
        "throughput": float(rate.group(1)),
        "completed": int(counts.group(1)),
        "failed": int(counts.group(3)),
    }


def measure(
    scenario: Scenario,
    database: str,
    load: Load,
    rate: float | None,
    log: IO[bytes],
    max_rate: float = 20_000.0,
    own_half: bool = False,
    server: ServerProcess | None = None,
) -> Measurement:
    """One scenario, at saturation then at a fixed ``rate``, on a fresh server process
    (or on ``server``, left running).

    ``own_half``: the fixed rate is half of this scenario's own saturation throughput (how
    the first echo run sets it for the others). ``rate`` None and not ``own_half``: no
    fixed-load phase. ``max_rate`` bounds the calls a phase can make, for workloads that
    never repeat a key.
    """
    if server is None:
        server = ServerProcess(scenario.mode, scenario.env, load.server_core, log)
        try:
            result = measure(scenario, database, load, rate, log, max_rate, own_half, server)
        finally:
            spent, calls = server.stop()
        result.handler_us_per_call = spent / calls / 1000 if calls else None
        return result
    workload = scenario.workload
    result = Measurement(scenario.name, scenario.mode, database, scenario.note, workload.distinct)
    checks = _spread(workload.make(SAMPLES), SAMPLES)
    result.sample_errors += sample(server.port, workload.caller, checks)
    calls_needed = int(1.3 * max_rate * (load.warmup + load.seconds)) + 1000
    result.saturation = run_h2gen(
        server.port, server.pid, workload.caller, workload.make(calls_needed), load, None
    )
    if own_half:
        rate = result.saturation["throughput"] / 2
    if rate is not None:
        calls_needed = int(rate * (load.latency_seconds + 1) * 1.2)
        result.fixed_load = run_h2gen(
            server.port, server.pid, workload.caller, workload.make(calls_needed), load, rate
        )
    if load.h2load is not None and scenario.fixed_body:
        result.h2load = run_h2load(server.port, workload.caller, workload.make(1)[0][0], load)
    result.sample_errors += sample(server.port, workload.caller, checks)
    result.sampled = 2 * len(checks)
    result.server_rss_bytes = proc.rss_bytes(server.pid)
    return result


def find_h2load() -> str | None:
    return shutil.which("h2load")
