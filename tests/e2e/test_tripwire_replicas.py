"""The tripwire's rate limit across real servers: two ``apikeys-server serve`` processes on one
PostgreSQL database, both flooded with one revoked key while they flush every 50 ms.

Each process alone would write its own PRESENTED_AFTER_REVOCATION event; the database's claim
(tests/integration/test_tripwire.py::TestAcrossProcesses, with its negative control) lets one
through a minute, and the counts add up exactly.
"""

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from apikeys.v1 import key_verifier_pb2
from tests.e2e.conftest import ServerProcess, start_server, truncate

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

THREADS_PER_SERVER = 2
CALLS_PER_THREAD = 500
FLUSH_OFTEN = {"APIKEYS_LAST_USED_FLUSH_SECONDS": "0.05"}


def _flood(server: ServerProcess, secret: str, answers: list[int]) -> None:
    with server.client() as client:
        for _ in range(CALLS_PER_THREAD):
            answers.append(client.verify(secret, tenant_id="acme").code)


def test_two_servers_flooded_write_one_event_and_count_every_call(
    postgres_url: str, tmp_path: Path
) -> None:
    """2 servers x 2 threads x 500 Verify calls of one revoked key, in well under a minute:
    every answer REVOKED, the key's count 2 000, and one event in the audit trail."""
    truncate(postgres_url)
    servers = [start_server(postgres_url, tmp_path, FLUSH_OFTEN) for _ in range(2)]
    try:
        with servers[0].client() as client:
            created = client.create_key("leaked-svc", ["passes:read"], tenant_id="acme")
            servers[0].remember(created.secret)
            client.revoke_key(created.key.id, tenant_id="acme")
        answers: list[int] = []
        threads = [
            threading.Thread(target=_flood, args=(server, created.secret, answers))
            for server in servers
            for _ in range(THREADS_PER_SERVER)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # The limit is one event a minute: a flood longer than that may rightly write two.
        assert time.monotonic() - started < 50
    finally:
        for server in servers:
            server.check_stopped_cleanly()  # SIGTERM: each writes what it gathered, then exits
    total = len(servers) * THREADS_PER_SERVER * CALLS_PER_THREAD
    assert answers == [key_verifier_pb2.VERIFY_CODE_REVOKED] * total
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            count = connection.execute(
                text("SELECT presented_after_revocation_count FROM api_keys WHERE id = :id"),
                {"id": created.key.id},
            ).scalar_one()
            events = connection.execute(
                text("SELECT count(*) FROM key_events WHERE key_id = :id AND action = 'presented'"),
                {"id": created.key.id},
            ).scalar_one()
    finally:
        engine.dispose()
    assert count == total
    assert events == 1
