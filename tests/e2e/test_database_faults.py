"""The real ``apikeys-server`` process with PostgreSQL behind a blackhole (bench/tcp_proxy.py)."""

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from apikeys.v1 import key_verifier_pb2, key_verifier_pb2_grpc
from bench.tcp_proxy import TcpProxy
from tests.e2e.conftest import assert_no_secrets, free_port, run_cli, start_server
from tests.faults import proxy_to, through

pytestmark = pytest.mark.postgres

GRACE = 2.0
STOP_SLACK = 5.0
SCOPES = ["passes:read"]


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[TcpProxy]:
    proxy = proxy_to(postgres_url)
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("migrate", ["true", "false"])
def test_serve_against_a_blackholed_database_exits_with_one_line(
    proxy: TcpProxy, postgres_url: str, migrate: str
) -> None:
    """Migrating, or (migrations off) checking the database, fails within the connect bound:
    serve exits non-zero with one line instead of hanging or reporting SERVING."""
    proxy.blackhole()
    started = time.monotonic()
    result = run_cli(
        "serve",
        "--database-url",
        through(proxy, postgres_url),
        "--listen",
        f"127.0.0.1:{free_port()}",
        env={"APIKEYS_MIGRATE_ON_START": migrate},
        timeout=30,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("apikeys-server: cannot use postgresql+psycopg://"), lines[0]
    assert seconds <= 10, f"serve took {seconds:.1f} s to give up"


def test_sigterm_with_a_hung_database_and_calls_in_flight_exits_in_time(
    proxy: TcpProxy, postgres_url: str, tmp_path: Path
) -> None:
    """SIGTERM ends the process within the grace plus a few seconds, database hung or not:
    in-flight calls end at their bound, the last-used flush at shutdown tries once."""
    env = {
        "APIKEYS_SHUTDOWN_GRACE_SECONDS": str(GRACE),
        "APIKEYS_DB_WRITE_TIMEOUT_SECONDS": "2",
        "APIKEYS_CACHE_TTL_SECONDS": "3600",
    }
    server = start_server(through(proxy, postgres_url), tmp_path, env)
    try:
        with server.client() as client:
            used = client.create_key("used", SCOPES, tenant_id="acme")
            assert client.verify(used.secret, SCOPES, tenant_id="acme").valid  # last-used pending
            uncached = [
                client.create_key(f"uncached-{i}", SCOPES, tenant_id="acme").secret
                for i in range(4)
            ]
        proxy.blackhole()
        with grpc.insecure_channel(server.target) as channel:
            verify = key_verifier_pb2_grpc.KeyVerifierStub(channel).Verify
            metadata = (("x-api-key", server.admin_key),)
            in_flight = [
                verify.future(
                    key_verifier_pb2.VerifyRequest(
                        key=secret, tenant_id="acme", required_scopes=SCOPES
                    ),
                    metadata=metadata,
                    timeout=30,
                )
                for secret in uncached
            ]
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            try:
                status = server.process.wait(timeout=GRACE + STOP_SLACK)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"server still running {GRACE + STOP_SLACK} s after SIGTERM:\n{server.log()}"
                )
            seconds = time.monotonic() - started
            codes = {call.exception().code() for call in in_flight if call.exception()}
        assert status == 0, server.log()
        assert seconds <= GRACE + STOP_SLACK
        assert codes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes
        assert "last-used" in server.log()  # the flush at shutdown tried, and said it failed
        assert_no_secrets(server.log(), [*server.secrets, used.secret, *uncached], "the log")
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
