"""Stopping a real server process: signals, draining, flushing, and what stays on disk."""

import ctypes
import os
import platform
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from apikeys.v1 import key_verifier_pb2
from apikeys_client import ApiKeysError, Unavailable
from tests.e2e.conftest import ServerFactory, ServerProcess, assert_no_secrets

pytestmark = pytest.mark.e2e

VALID = key_verifier_pb2.VERIFY_CODE_VALID
REVOKED = key_verifier_pb2.VERIFY_CODE_REVOKED
CALLERS = 4
MAX_CALLS_PER_CALLER = 5000


def sqlite_path(server: ServerProcess) -> Path:
    return Path(server.database_url.removeprefix("sqlite:///"))


def key_row(path: Path, key_id: str) -> tuple[str, str | None]:
    """(create_time, last_used_time) as stored, read with the sqlite3 module directly."""
    with sqlite3.connect(path) as connection:
        row = connection.execute(
            "SELECT create_time, last_used_time FROM api_keys WHERE id = ?", (key_id,)
        ).fetchone()
    assert row is not None, key_id
    return row


def refused_by_shutdown(error: ApiKeysError) -> bool:
    """UNAVAILABLE once the server stops listening; CANCELLED for a call that reached the
    transport but no handler yet: gRPC core answers those so (grpc/grpc#41785), not our code."""
    if isinstance(error, Unavailable):
        return True
    return error.code == grpc.StatusCode.CANCELLED


def _send_to_thread(pid: int, tid: int, sig: signal.Signals) -> None:
    """tgkill(2): deliver ``sig`` to one thread of another process, as the kernel may."""
    libc = ctypes.CDLL(None, use_errno=True)
    sys_tgkill = 234  # x86_64
    if libc.syscall(sys_tgkill, pid, tid, int(sig)) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


class TestSignals:
    @pytest.mark.skipif(platform.machine() != "x86_64", reason="tgkill syscall number is x86_64's")
    def test_a_signal_delivered_to_another_thread_still_stops_the_server(
        self, server_factory: ServerFactory
    ) -> None:
        """The kernel may hand SIGTERM to any thread (the follower, the watchdog, gRPC's):
        the main thread must still see it and drain (it once waited without a timeout)."""
        server = server_factory()
        pid = server.process.pid
        others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
        assert others
        for tid in others:  # the first thread that does not block SIGTERM takes it
            try:
                _send_to_thread(pid, tid, signal.SIGTERM)
                break
            except OSError:
                continue
        try:
            status = server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
            pytest.fail("SIGTERM delivered to a non-main thread was ignored for 10 s")
        assert status == 0
        assert "draining" in server.log()

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
    def test_signal_after_calls_exits_zero(
        self, server_factory: ServerFactory, sig: signal.Signals
    ) -> None:
        """After serving calls, SIGTERM or SIGINT stops the server with exit status 0."""
        server = server_factory()
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id="acme")
            for _ in range(3):
                assert client.verify(created.secret, tenant_id="acme").code == VALID
        assert server.terminate(sig) == 0
        log = server.log()
        assert "draining" in log
        assert "apikeys server stopped" in log

    def test_calls_during_shutdown_finish_or_are_refused(
        self, server_factory: ServerFactory
    ) -> None:
        """Calls racing SIGTERM complete or are refused, never fail otherwise; exit status 0."""
        server = server_factory()
        with server.client() as admin:
            secret = admin.create_key("svc", ["passes:read"], tenant_id="acme").secret
        started = threading.Barrier(CALLERS + 1)
        outcomes: list[tuple[int, ApiKeysError | None]] = []
        lock = threading.Lock()

        def caller() -> None:
            ok, failure = 0, None
            with server.client() as client:
                assert client.verify(secret, tenant_id="acme").code == VALID
                started.wait()
                for _ in range(MAX_CALLS_PER_CALLER):
                    try:
                        assert client.verify(secret, tenant_id="acme").code == VALID
                    except ApiKeysError as error:
                        failure = error
                        break
                    ok += 1
            with lock:
                outcomes.append((ok, failure))

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        for thread in threads:
            thread.start()
        started.wait()
        status = server.terminate()
        for thread in threads:
            thread.join()
        assert status == 0
        assert len(outcomes) == CALLERS
        for _, failure in outcomes:
            assert failure is None or refused_by_shutdown(failure), failure


class TestDraining:
    @pytest.mark.parametrize("grace", ["10", pytest.param("0", id="no-grace-negative-control")])
    def test_a_call_in_flight_at_sigterm_is_answered(
        self, server_factory: ServerFactory, grace: str
    ) -> None:
        """A CreateKey waiting on the database when SIGTERM arrives is finished and answered
        (the key exists, the caller has its secret); with no grace the server cancels it."""
        server = server_factory(
            env={"APIKEYS_SHUTDOWN_GRACE_SECONDS": grace, "APIKEYS_DB_WRITE_TIMEOUT_SECONDS": "10"}
        )
        with server.client() as admin:
            admin.create_key("warm-up", ["passes:read"], tenant_id="acme")
        answer: list[object] = []
        # A real lock, not a stand-in: another connection holds SQLite's write lock, so the
        # server's write waits (its busy timeout) until the test lets go.
        blocker = sqlite3.connect(sqlite_path(server), isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")

        def create() -> None:
            with server.client(timeout=30) as client:
                try:
                    answer.append(client.create_key("in-flight", ["passes:read"], tenant_id="acme"))
                except ApiKeysError as error:
                    answer.append(error)

        caller = threading.Thread(target=create)
        caller.start()
        try:
            time.sleep(0.5)  # the call has reached its handler and waits for the lock
            server.process.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the server is draining
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        caller.join(timeout=30)
        status = server.terminate()
        assert status == 0
        if grace == "0":
            assert isinstance(answer[0], ApiKeysError), answer
            return
        assert not isinstance(answer[0], ApiKeysError), answer
        with sqlite3.connect(sqlite_path(server)) as connection:
            names = {row[0] for row in connection.execute("SELECT name FROM api_keys")}
        assert "in-flight" in names


class TestStateOnDisk:
    def test_last_used_is_flushed_on_shutdown(self, server_factory: ServerFactory) -> None:
        """With a one-hour flush interval, a Verify's last-used time is written by SIGTERM."""
        server = server_factory({"APIKEYS_LAST_USED_FLUSH_SECONDS": "3600"})
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id="acme")
            assert client.verify(created.secret, tenant_id="acme").code == VALID
            fetched = client.get_key(created.key.id, tenant_id="acme")
        path = sqlite_path(server)
        assert not fetched.HasField("last_used_time")
        assert key_row(path, created.key.id)[1] is None
        assert server.terminate() == 0
        create_time, last_used_time = key_row(path, created.key.id)
        assert last_used_time is not None
        assert last_used_time >= create_time  # same stored format: ISO order is time order

    def test_restart_serves_the_same_keys(self, server_factory: ServerFactory) -> None:
        """A restarted server on the same database verifies old keys and keeps revocations."""
        first = server_factory()
        tenant = f"t-{uuid.uuid4().hex[:8]}"
        with first.client() as client:
            kept = client.create_key("kept", ["passes:read"], tenant_id=tenant)
            gone = client.create_key("gone", ["passes:read"], tenant_id=tenant)
            client.revoke_key(gone.key.id, tenant_id=tenant)
            assert client.verify(kept.secret, tenant_id=tenant).code == VALID
        assert first.terminate() == 0
        second = server_factory(database_url=first.database_url)
        second.secrets.extend(first.secrets)
        with second.client() as client:
            kept_answer = client.verify(kept.secret, ["passes:read"], tenant_id=tenant)
            gone_answer = client.verify(gone.secret, ["passes:read"], tenant_id=tenant)
            reread = client.get_key(kept.key.id, tenant_id=tenant)
        assert kept_answer.code == VALID
        assert gone_answer.code == REVOKED
        assert reread.HasField("last_used_time")

    def test_database_files_never_hold_a_secret(self, server_factory: ServerFactory) -> None:
        """After create, rotate, verify and revoke, no secret is in any SQLite file."""
        server = server_factory()
        with server.client() as client:
            created = client.create_key("svc", ["passes:read"], tenant_id="acme")
            rotated = client.rotate_key(created.key.id, timedelta(minutes=5), tenant_id="acme")
            assert client.verify(rotated.secret, tenant_id="acme").code == VALID
            client.revoke_key(rotated.key.id, tenant_id="acme", reason="test")
        path = sqlite_path(server)
        # Read while running (the WAL holds recent writes) and again after shutdown.
        while_running = _database_bytes(path)
        assert server.terminate() == 0
        after = _database_bytes(path)
        assert len(server.secrets) == 3
        assert_no_secrets(while_running.decode("latin-1"), server.secrets, "the database")
        assert_no_secrets(after.decode("latin-1"), server.secrets, "the database")
        assert created.key.hint.rstrip("…").encode() in while_running + after


def _database_bytes(path: Path) -> bytes:
    files = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    assert path in files
    return b"".join(p.read_bytes() for p in files)
