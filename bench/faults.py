"""``python -m bench faults``: one real ``serve`` process with PostgreSQL behind a TcpProxy.

Phases: normal, database stopped (``refuse``), recovered, blackholed (within the staleness
bound), crossing the bound, past the bound (still blackholed), recovered. In each, four threads
call for the phase's seconds: Verify of a cached valid key, of a cached revoked key, of a key
never verified (a new one each call), and CreateKey. Each answer is recorded with its phase
(the phase the call started in) and duration; a health thread records every transition.

Right answers: cached valid → VALID or UNAVAILABLE; cached revoked → REVOKED or UNAVAILABLE;
uncached → VALID or UNAVAILABLE; CreateKey → OK or UNAVAILABLE. Anything else is wrong.
"""

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import insert
from sqlalchemy.engine import make_url

from apikeys.v1 import key_verifier_pb2
from apikeys_client import ApiKeysClient, ApiKeysError
from apikeys_server.storage.database import open_database
from apikeys_server.storage.models import api_keys
from apikeys_server.storage.repository import key_row
from bench import fixtures, sections
from bench.processes import Placement, ServeProcess
from bench.propagation import admin_key
from bench.runner import ROOT
from bench.tcp_proxy import TcpProxy

READ = "passes:read"
STALENESS = 3.0
READ_BOUND = 2.0
WRITE_BOUND = 2.0
KINDS = ("cached valid", "cached revoked", "uncached", "CreateKey")
ALLOWED = {
    "cached valid": {"VALID", "UNAVAILABLE"},
    "cached revoked": {"REVOKED", "UNAVAILABLE"},
    "uncached": {"VALID", "UNAVAILABLE"},
    "CreateKey": {"OK", "UNAVAILABLE"},
}


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    longest: float = 0.0


@dataclass
class Recorder:
    phase: str = "setup"
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    health: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    calls: list[tuple[float, float, str, str]] = field(default_factory=list)  # start, end

    def note(self, phase: str, kind: str, code: str, seconds: float) -> None:
        end = time.monotonic()
        with self.lock:
            self.calls.append((end - seconds, end, kind, code))
            tally = self.tallies.setdefault((phase, kind), Tally())
            tally.codes[code] += 1
            tally.longest = max(tally.longest, seconds)


def _code(call: Callable[[], Any]) -> tuple[str, float]:
    started = time.monotonic()
    try:
        answer = call()
        if isinstance(answer, key_verifier_pb2.VerifyResponse):
            code = key_verifier_pb2.VerifyCode.Name(answer.code).removeprefix("VERIFY_CODE_")
        else:
            code = "OK"
    except ApiKeysError as error:
        code = error.code.name
    return code, time.monotonic() - started


def _caller(recorder: Recorder, kind: str, call: Callable[[], Any]) -> None:
    while not recorder.stop.is_set():
        phase = recorder.phase
        code, seconds = _code(call)
        if phase != "setup":
            recorder.note(phase, kind, code, seconds)
        time.sleep(0.01)


def _health(recorder: Recorder, target: str) -> None:
    last = ""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not recorder.stop.is_set():
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5).status
                now = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as error:
                now = f"error {error.code().name}"
            if now != last:
                with recorder.lock:
                    recorder.health.append((time.monotonic() - recorder.started, now))
                last = now
            time.sleep(0.02)


def _uncached_keys(url: str, count: int) -> list[str]:
    """Keys of tenant acme inserted directly: no server has ever verified them."""
    database = open_database(url, pool_size=1)
    now = datetime.now(UTC)
    keys = [fixtures.new_key(f"uncached-{n}", now, "acme") for n in range(count)]
    try:
        with database.write_engine.begin() as connection:
            connection.execute(insert(api_keys), [key_row(key.record) for key in keys])
    finally:
        database.dispose()
    return [key.secret for key in keys]


def _recovery(recorder: Recorder, since: float) -> dict[str, float | None]:
    """Seconds from ``since`` (the path returned) to the end of the first uncached Verify
    started after it that answered VALID, and to health SERVING (both recorded meanwhile)."""
    with recorder.lock:
        ends = [
            e
            for s, e, kind, code in recorder.calls
            if s >= since and kind == "uncached" and code == "VALID"
        ]
        serving = [
            at + recorder.started
            for at, status in recorder.health
            if at + recorder.started >= since and status == "SERVING"
        ]
    return {
        "first_uncached_valid_s": min(ends) - since if ends else None,
        "health_serving_s": min(serving) - since if serving else None,
    }


def run(postgres_url: str, seconds: float, directory: Path) -> dict[str, Any]:
    with fixtures.postgres_database(postgres_url) as url:
        caller = admin_key(url)
        direct = make_url(url)
        proxy = TcpProxy((direct.host or "127.0.0.1", direct.port or 5432), lifetime=600.0)
        proxied = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False
        )
        uncached = _uncached_keys(url, 2000)
        env = {
            "APIKEYS_MAX_STALENESS_SECONDS": str(STALENESS),
            "APIKEYS_DB_READ_TIMEOUT_SECONDS": str(READ_BOUND),
            "APIKEYS_DB_WRITE_TIMEOUT_SECONDS": str(WRITE_BOUND),
            "APIKEYS_MIGRATE_ON_START": "false",
        }
        server = ServeProcess(1, proxied, Placement(None, None), directory / "server.log", env)
        target = f"127.0.0.1:{server.port}"
        recorder = Recorder()
        client = ApiKeysClient(target, caller, timeout=30)
        recoveries: dict[str, dict[str, float | None]] = {}
        try:
            valid = client.create_key("valid", [READ], tenant_id="acme").secret
            revoked = client.create_key("revoked", [READ], tenant_id="acme")
            assert client.verify(valid, [READ], tenant_id="acme").valid
            client.revoke_key(revoked.key.id, tenant_id="acme")
            code, _ = _code(lambda: client.verify(revoked.secret, [READ], tenant_id="acme"))
            assert code == "REVOKED", code
            calls: dict[str, Callable[[], Any]] = {
                "cached valid": lambda: client.verify(valid, [READ], tenant_id="acme"),
                "cached revoked": lambda: client.verify(revoked.secret, [READ], tenant_id="acme"),
                "uncached": lambda: client.verify(uncached.pop(), [READ], tenant_id="acme"),
                "CreateKey": lambda: client.create_key("during", [READ], tenant_id="acme"),
            }
            threads = [
                threading.Thread(target=_caller, args=(recorder, kind, call), daemon=True)
                for kind, call in calls.items()
            ]
            threads.append(threading.Thread(target=_health, args=(recorder, target), daemon=True))
            for thread in threads:
                thread.start()

            def phase(name: str, length: float) -> None:
                recorder.phase = name
                with recorder.lock:
                    recorder.health.append((time.monotonic() - recorder.started, f"[{name}]"))
                time.sleep(length)

            phase("normal", seconds)
            proxy.refuse()
            phase("database stopped", seconds)
            proxy.resume()
            ended = time.monotonic()
            phase("recovered (after stop)", seconds)
            recoveries["after stop"] = _recovery(recorder, ended)
            proxy.blackhole()
            phase("blackholed, within the bound", STALENESS - 0.5)
            phase("blackholed, crossing the bound", 1.0)
            phase("blackholed, past the bound", seconds)
            proxy.resume()
            ended = time.monotonic()
            phase("recovered (after blackhole)", seconds)
            recoveries["after blackhole"] = _recovery(recorder, ended)
            recorder.stop.set()
            for thread in threads:
                thread.join(timeout=35)
        finally:
            recorder.stop.set()
            client.close()
            server.stop()
            proxy.stop()
        log = (directory / "server.log").read_text(errors="replace")
    return {
        "tallies": recorder.tallies,
        "health": recorder.health,
        "recoveries": recoveries,
        "exit_status": server.process.returncode,
        "tracebacks": log.count("Traceback"),
    }


def render(result: dict[str, Any]) -> tuple[str, list[str]]:
    tallies: dict[tuple[str, str], Tally] = result["tallies"]
    phases: list[str] = []
    for name, _ in tallies:
        if name not in phases:
            phases.append(name)
    lines = ["| phase | " + " | ".join(KINDS) + " | longest call |", "|---|---|---|---|---|---:|"]
    wrong = bad = 0
    longest = 0.0
    for name in phases:
        cells = []
        phase_longest = 0.0
        for kind in KINDS:
            tally = tallies.get((name, kind), Tally())
            cells.append(", ".join(f"{code} {n}" for code, n in sorted(tally.codes.items())))
            phase_longest = max(phase_longest, tally.longest)
            wrong += sum(n for code, n in tally.codes.items() if code not in ALLOWED[kind])
            bad += tally.codes["UNKNOWN"] + tally.codes["INTERNAL"]
        longest = max(longest, phase_longest)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {phase_longest:.2f} s |")
    lines.append("")
    lines.append("Health (grpc.health.v1, seconds from the start of the phases; [phase] marks):")
    lines.append("")
    start = next((at for at, status in result["health"] if status == "[normal]"), 0.0)
    lines.append(
        ", ".join(f"{at - start:.2f} {status}" for at, status in result["health"] if at >= start)
    )
    lines.append("")
    recoveries = result["recoveries"]
    worst = 0.0
    for name, found in recoveries.items():
        values = [v for v in found.values()]
        worst = max([worst, *(v if v is not None else float("inf") for v in values)])
        first, serving = found["first_uncached_valid_s"], found["health_serving_s"]
        lines.append(
            f"Recovery {name}: first VALID uncached Verify "
            f"{'never' if first is None else f'{first:.2f} s'}, health SERVING "
            f"{'never' if serving is None else f'{serving:.2f} s'} after the path returned."
        )

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    checks = [
        f"wrong answers: {wrong}: {verdict(wrong == 0)}",
        f"UNKNOWN/INTERNAL: {bad}: {verdict(bad == 0)}",
        f"longest call {longest:.2f} s (goal ≤ 2.5 s): {verdict(longest <= 2.5)}",
        f"recovery {worst:.2f} s (goal ≤ 2 s): {verdict(worst <= 2.0)}",
        f"server exit status {result['exit_status']}, tracebacks in its log "
        f"{result['tracebacks']}: {verdict(result['exit_status'] == 0)}",
    ]
    return "\n".join(lines), checks


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase (4)")
    parser.add_argument("--postgres-url", default=fixtures.DEFAULT_POSTGRES)
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m bench faults" + (f" {' '.join(argv)}" if argv else "")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="apikeys-faults-") as temporary:
        result = run(args.postgres_url, args.seconds, Path(temporary))
    table, checks = render(result)
    print(table)
    print()
    print("\n".join(checks))
    if not args.no_markdown:
        body = (
            f"Command: `{command}` (about {time.monotonic() - started:.0f} s). Run "
            f"{sections.machine_line()}. Server settings: APIKEYS_MAX_STALENESS_SECONDS="
            f"{STALENESS:g}, DB read bound {READ_BOUND:g} s, DB write bound {WRITE_BOUND:g} s "
            f"(the default write bound is 5 s), connect bound 2 s, feed poll 0.25 s.\n\n"
            f"{table}\n\n" + "\n".join(f"- {line}" for line in checks)
        )
        sections.write(args.markdown, "faults", body)
        print(f"wrote {args.markdown}")
    print(f"{time.monotonic() - started:.0f} s in all", file=sys.stderr)
    return 0 if all("MISSED" not in line for line in checks[:2]) else 1
