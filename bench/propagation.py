"""``python -m bench propagation``: how fast a change made through one replica reaches others.

Three real ``apikeys-server serve`` processes (A, B, C) on one fresh PostgreSQL database, each
with its cache TTL at an hour (only the change feed can explain a fresh answer). Each trial
creates a key through A, verifies it on B and C (now cached there), changes it through A —
revoke, remove a scope (UpdateKey), rotate with overlap 0 — and polls B and C in turn from A's
acknowledgement until each answers REVOKED / INSUFFICIENT_SCOPE / EXPIRED. Meanwhile another
process keeps a Verify load on B and C. Then the listener trials: B's LISTEN connection is
killed (``pg_terminate_backend``, once B is listening again) and a key warm in B is revoked
through A while B has no listener; only B's poll (or its reconnection) can see it.
"""

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from apikeys.v1 import key_verifier_pb2, key_verifier_pb2_grpc
from apikeys_client import ApiKeysClient
from apikeys_server.app import build_services
from apikeys_server.config import Settings
from apikeys_server.domain import scopes
from apikeys_server.domain.validation import PLATFORM_TENANT
from apikeys_server.storage.database import open_database
from apikeys_server.storage.feed import SqlChangeFeed
from bench import fixtures, pg, sections
from bench.processes import Placement, ServeProcess
from bench.runner import ROOT

VALID = key_verifier_pb2.VERIFY_CODE_VALID
REVOKED = key_verifier_pb2.VERIFY_CODE_REVOKED
EXPIRED = key_verifier_pb2.VERIFY_CODE_EXPIRED
INSUFFICIENT_SCOPE = key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
READ, WRITE = "passes:read", "passes:write"
TENANT = "acme"
STALE_AFTER = 0.5  # an answer still stale this long after the acknowledgement is counted
POLL_BOUND = 3.0  # a trial gives up after this (counted as a miss)
TICK = 0.25  # APIKEYS_FEED_POLL_SECONDS (the default)
LOAD_THREADS_PER_REPLICA = 2
LOAD_KEYS = 50
CHANGES = ("revoke", "remove scope", "rotate overlap 0")


def admin_key(url: str) -> str:
    """Migrates ``url`` and creates a platform key with every admin scope (as admin-key does)."""
    services = build_services(Settings(database_url=url, last_used_flush_seconds=3600.0))
    try:
        issued = services.manager.create_unchecked(
            PLATFORM_TENANT, "bench-admin", [scopes.MANAGE, scopes.READ, scopes.VERIFY], None
        )
    finally:
        services.close()
    return issued.secret


# -- background load (its own process, so its GIL is not the harness's) ----------------------


def _load_thread(
    target: str, caller: str, secrets: list[str], stop: EventType, counts: list[int]
) -> None:
    with grpc.insecure_channel(target) as channel:
        verify = key_verifier_pb2_grpc.KeyVerifierStub(channel).Verify
        metadata = (("x-api-key", caller),)
        index = 0
        while not stop.is_set():
            request = key_verifier_pb2.VerifyRequest(
                key=secrets[index % len(secrets)], tenant_id=TENANT, required_scopes=[READ]
            )
            index += 1
            try:
                verify(request, metadata=metadata, timeout=2.0)
                counts[0] += 1
            except grpc.RpcError:
                counts[1] += 1


def _load_main(
    targets: list[str],
    caller: str,
    secrets: list[str],
    stop: EventType,
    seconds: float,
    result: "multiprocessing.Queue[tuple[int, int]]",
) -> None:
    counts = [0, 0]
    threads = [
        threading.Thread(target=_load_thread, args=(t, caller, secrets, stop, counts))
        for t in targets
        for _ in range(LOAD_THREADS_PER_REPLICA)
    ]
    for thread in threads:
        thread.start()
    stop.wait(seconds)  # bounded in time even if the harness dies
    stop.set()
    for thread in threads:
        thread.join()
    result.put((counts[0], counts[1]))


# -- trials -----------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    times: list[float] = field(default_factory=list)  # seconds from acknowledgement
    missed: int = 0  # not seen within POLL_BOUND
    stale_late: int = 0  # stale answers seen more than STALE_AFTER after acknowledgement
    answers: int = 0

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.times)

        def pick(q: float) -> float | None:
            if not ordered:
                return None
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

        return {
            "name": self.name,
            "trials": len(ordered) + self.missed,
            "p50_ms": pick(0.5),
            "p99_ms": pick(0.99),
            "max_ms": ordered[-1] * 1000 if ordered else None,
            "mean_ms": statistics.fmean(ordered) * 1000 if ordered else None,
            "missed": self.missed,
            "stale_late": self.stale_late,
            "answers": self.answers,
            "within_tick": sum(1 for t in ordered if t <= TICK),
            "within_500ms": sum(1 for t in ordered if t <= STALE_AFTER),
        }


def _poll(
    clients: list[ApiKeysClient],
    series: list[Series],
    secret: str,
    asked: list[str],
    code: int,
    acked: float,
) -> None:
    pending = set(range(len(clients)))
    while pending:
        for index in sorted(pending):
            answer = clients[index].verify(secret, asked, tenant_id=TENANT).code
            now = time.monotonic()
            series[index].answers += 1
            if answer == code:
                series[index].times.append(now - acked)
                pending.discard(index)
            elif now - acked > STALE_AFTER:
                series[index].stale_late += 1
            if now - acked > POLL_BOUND and index in pending:
                series[index].missed += 1
                pending.discard(index)


def warm(
    a: ApiKeysClient, others: list[ApiKeysClient], granted: list[str], feed: SqlChangeFeed
) -> tuple[str, str]:
    """A new key, cached in each of ``others`` *after* they applied its creation from the feed
    (creating a key evicts its digest: an entry cached before would be evicted then, and the
    change would be "seen" as a plain cache miss). Verify's feed_position is read before its
    lookup, so an answer at or past the head cached what the database held after the create."""
    created = a.create_key("trial", granted, tenant_id=TENANT)
    head = feed.head()
    deadline = time.monotonic() + POLL_BOUND
    for client in others:
        while True:
            answer = client.verify(created.secret, granted, tenant_id=TENANT)
            if answer.code != VALID:
                raise RuntimeError(f"a new key answered {answer.code} before the change")
            if answer.feed_position >= head:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"a replica did not reach feed position {head}")
    return created.key.id, created.secret


def run_trials(
    kind: str,
    a: ApiKeysClient,
    b: ApiKeysClient,
    c: ApiKeysClient,
    trials: int,
    feed: SqlChangeFeed,
) -> list[Series]:
    series = [Series(f"{kind}, B"), Series(f"{kind}, C")]
    for _ in range(trials):
        if kind == "revoke":
            key_id, secret = warm(a, [b, c], [READ], feed)
            a.revoke_key(key_id, tenant_id=TENANT)
            asked, code = [READ], REVOKED
        elif kind == "remove scope":
            key_id, secret = warm(a, [b, c], [READ, WRITE], feed)
            a.update_key(key_id, tenant_id=TENANT, scopes=[READ])
            asked, code = [WRITE], INSUFFICIENT_SCOPE
        else:
            key_id, secret = warm(a, [b, c], [READ], feed)
            a.rotate_key(key_id, timedelta(0), tenant_id=TENANT)
            asked, code = [READ], EXPIRED
        _poll([b, c], series, secret, asked, code, time.monotonic())
    return series


def run_listener_trials(
    a: ApiKeysClient, b: ApiKeysClient, url: str, b_pid: int, trials: int, feed: SqlChangeFeed
) -> Series:
    series = Series("revoke after B's LISTEN killed, B")
    database = make_url(url).database or ""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        for _ in range(trials):
            key_id, secret = warm(a, [b], [READ], feed)
            pg.kill_listener(admin, database, b_pid)
            a.revoke_key(key_id, tenant_id=TENANT)
            _poll([b], [series], secret, [READ], REVOKED, time.monotonic())
    finally:
        admin.dispose()
    return series


# -- the run ----------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"[bench propagation] {message}", file=sys.stderr, flush=True)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def render(rows: list[dict[str, Any]], kill: dict[str, Any], load: tuple[int, int]) -> str:
    lines = [
        "| change, replica | trials | p50 ms | p99 ms | max ms | stale answers > 500 ms | "
        "not seen in 3 s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['trials']} | {_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | "
            f"{_ms(row['max_ms'])} | {row['stale_late']} | {row['missed']} |"
        )
    lines.append("")
    lines.append(
        "| listener killed, then revoke | trials | seen ≤ 250 ms (one poll tick) | "
        "seen ≤ 500 ms | p50 ms | p99 ms | max ms | not seen in 3 s |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    lines.append(
        f"| B | {kill['trials']} | {kill['within_tick']}/{kill['trials']} | "
        f"{kill['within_500ms']}/{kill['trials']} | {_ms(kill['p50_ms'])} | "
        f"{_ms(kill['p99_ms'])} | {_ms(kill['max_ms'])} | {kill['missed']} |"
    )
    lines.append("")
    lines.append(
        f"Background load on B and C meanwhile: {load[0]:,} Verify calls answered "
        f"({load[1]:,} failed)."
    )
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], kill: dict[str, Any]) -> list[str]:
    p99 = max(row["p99_ms"] or float("inf") for row in rows)
    worst = max(row["max_ms"] or float("inf") for row in rows)
    stale = sum(row["stale_late"] + row["missed"] for row in rows)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return [
        f"p99 ≤ 100 ms: worst p99 {p99:,.1f} ms: {verdict(p99 <= 100)}",
        f"max ≤ 500 ms: worst max {worst:,.1f} ms: {verdict(worst <= 500)}",
        f"0 stale answers after 500 ms: {stale}: {verdict(stale == 0)}",
        f"listener killed, seen within the tick (250 ms): {kill['within_tick']}/"
        f"{kill['trials']}; within 500 ms: {kill['within_500ms']}/{kill['trials']}: "
        f"{verdict(kill['within_500ms'] == kill['trials'])}",
    ]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench propagation", description=__doc__)
    parser.add_argument("--trials", type=int, default=300, help="per change kind (300)")
    parser.add_argument("--kill-trials", type=int, default=100, help="listener kills (100)")
    parser.add_argument("--postgres-url", default=fixtures.DEFAULT_POSTGRES)
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-markdown", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m bench propagation" + (f" {' '.join(argv)}" if argv else "")
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="apikeys-propagation-") as temporary,
        fixtures.postgres_database(args.postgres_url) as url,
    ):
        caller = admin_key(url)
        database = open_database(url, pool_size=1)
        feed = SqlChangeFeed(database)
        log_path = Path(temporary) / "servers.log"
        servers: list[ServeProcess] = []
        try:
            for _ in "ABC":
                servers.append(ServeProcess(1, url, Placement(None, None), log_path))
            a, b, c = (
                ApiKeysClient(f"127.0.0.1:{server.port}", caller, timeout=10) for server in servers
            )
            load_keys = [
                a.create_key(f"load-{i}", [READ], tenant_id=TENANT).secret for i in range(LOAD_KEYS)
            ]
            context = multiprocessing.get_context("spawn")
            stop = context.Event()
            result: multiprocessing.Queue[tuple[int, int]] = context.Queue()
            targets = [f"127.0.0.1:{server.port}" for server in servers[1:]]
            loader = context.Process(
                target=_load_main, args=(targets, caller, load_keys, stop, 3600.0, result)
            )
            loader.start()
            try:
                rows: list[dict[str, Any]] = []
                for kind in CHANGES:
                    series = run_trials(kind, a, b, c, args.trials, feed)
                    rows.extend(s.summary() for s in series)
                    _say(f"{kind}: " + "; ".join(_brief(s.summary()) for s in series))
                kill = run_listener_trials(
                    a, b, url, servers[1].process.pid, args.kill_trials, feed
                ).summary()
                _say(f"listener: {_brief(kill)}")
            finally:
                stop.set()
                loader.join(30)
            load = result.get(timeout=5) if not result.empty() else (0, 0)
            for client in (a, b, c):
                client.close()
        finally:
            for server in servers:
                server.stop()
            database.dispose()
        statuses = [server.process.returncode for server in servers]
    table = render(rows, kill, load)
    checks = verdicts(rows, kill)
    print(table)
    print()
    print("\n".join(checks))
    print(f"\n{time.monotonic() - started:.0f} s in all; server exit statuses {statuses}")
    if not args.no_markdown:
        body = (
            f"Command: `{command}` (about {time.monotonic() - started:.0f} s). Run "
            f"{sections.machine_line()}.\n\n{table}\n\n" + "\n".join(f"- {line}" for line in checks)
        )
        sections.write(args.markdown, "propagation", body)
        print(f"wrote {args.markdown}")
    return 0 if all(status == 0 for status in statuses) else 1


def _brief(row: dict[str, Any]) -> str:
    return (
        f"{row['name']}: p50 {_ms(row['p50_ms'])} ms, p99 {_ms(row['p99_ms'])} ms, "
        f"max {_ms(row['max_ms'])} ms, stale>500ms {row['stale_late']}, missed {row['missed']}"
    )
