"""The client-side CachingVerifier: a cached check against the plain client's round trip, and
how soon a revocation reaches a caching verifier, against a real ``apikeys-server serve``.

    python -m bench.client_cache [--database-url URL] [--trials 200]

Default database: a fresh PostgreSQL database ``apikeys_bench_clients`` on 127.0.0.1:5432
(PostgreSQL wakes the server's change feed with NOTIFY; SQLite would poll).
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

import psycopg

from apikeys.v1 import key_verifier_pb2
from apikeys_client import ApiKeysClient, CachingVerifier

VALID = key_verifier_pb2.VERIFY_CODE_VALID
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
DB = "apikeys_bench_clients"


def _fresh_database() -> str:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB}")
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB}"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", default="")
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    url = args.database_url or _fresh_database()
    server = Path(sys.executable).parent / "apikeys-server"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIKEYS_")}
    admin = subprocess.run(
        [str(server), "admin-key", "--database-url", url],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    port = _port()
    process = subprocess.Popen(
        [str(server), "serve", "--listen", f"127.0.0.1:{port}", "--database-url", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        return _measure(f"127.0.0.1:{port}", admin, args.trials)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _measure(target: str, admin: str, trials: int) -> int:
    with ApiKeysClient(target, admin, timeout=10) as client:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.list_scopes()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        created = client.create_key("bench", ["passes:read"], tenant_id="acme")
        secret = created.secret
        with CachingVerifier(client) as verifier:
            while not verifier.cache.trusted():
                time.sleep(0.01)
            assert verifier.verify(secret, ["passes:read"], tenant_id="acme").code == VALID

            def cached() -> None:
                verifier.verify(secret, ["passes:read"], tenant_id="acme")

            def plain() -> None:
                client.verify(secret, ["passes:read"], tenant_id="acme")

            n_cached, n_plain = 200_000, 2_000
            cached_us = min(timeit.repeat(cached, number=n_cached, repeat=5)) / n_cached * 1e6
            plain_us = min(timeit.repeat(plain, number=n_plain, repeat=3)) / n_plain * 1e6
            print(f"cached check: {cached_us:.2f} µs (best of 5 × {n_cached})")
            print(f"plain client Verify round trip: {plain_us:.1f} µs (best of 3 × {n_plain})")
            print(f"ratio: {plain_us / cached_us:.0f}×")

            delays: list[float] = []
            for _ in range(trials):
                key = client.create_key("bench", ["passes:read"], tenant_id="acme")
                verifier.verify(key.secret, tenant_id="acme")
                assert verifier.verify(key.secret, tenant_id="acme").code == VALID
                start = time.perf_counter()
                client.revoke_key(key.key.id, tenant_id="acme")
                while verifier.verify(key.secret, tenant_id="acme").code == VALID:
                    time.sleep(0.0005)
                delays.append(time.perf_counter() - start)
            ms = [d * 1000 for d in delays]
            print(
                f"revocation → caching verifier, {trials} trials (from the RevokeKey call): "
                f"median {statistics.median(ms):.1f} ms, p99 {_percentile(ms, 0.99):.1f} ms, "
                f"max {max(ms):.1f} ms"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
