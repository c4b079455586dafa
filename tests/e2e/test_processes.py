"""``serve --processes N``: a parent and N worker processes on one address, seen from outside.

Workers are found through /proc (children of the server's pid); which worker serves a
connection is read from /proc too: the worker holding the accepted socket of that TCP
connection is the one every call on that channel went to.
"""

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from apikeys.v1 import key_verifier_pb2
from apikeys_client import ApiKeysClient, ApiKeysError
from tests.e2e.conftest import (
    READY_TIMEOUT_SECONDS,
    ServerFactory,
    ServerProcess,
    free_port,
    run_cli,
)

pytestmark = pytest.mark.e2e

VALID = key_verifier_pb2.VERIFY_CODE_VALID
REVOKED = key_verifier_pb2.VERIFY_CODE_REVOKED
PROCESSES = ("--processes", "2")
CHANNELS = 16
WRITERS = 4
GIVE_UP_SECONDS = 30.0
# Other processes learn of a revocation through the cache TTL; keep it short here.
SHORT_TTL = {"APIKEYS_CACHE_TTL_SECONDS": "0.2"}
T = TypeVar("T")


def wait_for(probe: Callable[[], T], what: str, timeout: float = READY_TIMEOUT_SECONDS) -> T:
    """Polls ``probe`` until it returns something true, or fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"not within {timeout:.0f} s: {what}")


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as file:
                state, ppid = file.read().rsplit(")", 1)[1].split()[:2]
        except OSError:  # gone meanwhile
            continue
        if int(ppid) == pid and state != "Z":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def serving_workers(server: ServerProcess, count: int = 2) -> set[int]:
    """Waits until the server has ``count`` workers, each of which logged that it serves."""

    def probe() -> set[int]:
        pids = children(server.process.pid)
        log = server.log()
        ready = {pid for pid in pids if f"worker {pid} serving" in log}
        return ready if len(ready) == count else set()

    return wait_for(probe, f"{count} workers serving")


def connections_by_worker(port: int, workers: set[int]) -> dict[int, set[int]]:
    """worker pid -> client ports of the established connections it accepted on ``port``."""
    inodes: dict[int, int] = {}  # socket inode -> remote port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as file:
            next(file)
            for line in file:
                parts = line.split()
                local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes[int(inode)] = int(remote.rsplit(":", 1)[1], 16)
    found: dict[int, set[int]] = {pid: set() for pid in workers}
    for pid in workers:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inode = int(link[8:-1])
                if inode in inodes:
                    found[pid].add(inodes[inode])
    return found


@contextmanager
def separate_clients(server: ServerProcess, count: int) -> Iterator[list[ApiKeysClient]]:
    """Clients each on a channel of its own TCP connection (no subchannel sharing)."""
    with ExitStack() as stack:
        clients = []
        for _ in range(count):
            channel = stack.enter_context(
                grpc.insecure_channel(
                    server.target, options=[("grpc.use_local_subchannel_pool", 1)]
                )
            )
            clients.append(
                stack.enter_context(ApiKeysClient(server.target, server.admin_key, channel=channel))
            )
        yield clients


def start_processes(server_factory: ServerFactory, database_url: str) -> ServerProcess:
    return server_factory(SHORT_TTL, database_url=database_url, args=PROCESSES)


class TestServing:
    def test_two_workers_both_serve(self, server_factory: ServerFactory, database_url: str) -> None:
        """Two children of the server process serve; separate connections reach both."""
        server = start_processes(server_factory, database_url)
        workers = serving_workers(server)
        with server.client() as admin:
            secret = server.remember(
                admin.create_key("svc", ["passes:read"], tenant_id="acme").secret
            )
        with separate_clients(server, CHANNELS) as clients:
            for client in clients:
                assert client.verify(secret, tenant_id="acme").code == VALID
            served = connections_by_worker(server.port, workers)
        assert all(served.values()), f"connections per worker: {served}"
        assert len(set().union(*served.values())) == CHANNELS
        log = server.log()
        assert log.count("Context impl") == 1  # alembic ran once: in the parent, no worker
        assert "starting 2 worker processes" in log


@dataclass
class Outcomes:
    created: list[tuple[str, str]] = field(default_factory=list)  # (key id, secret)
    revoked: list[str] = field(default_factory=list)
    # Revokes that failed: they may have committed before the connection broke.
    maybe_revoked: list[str] = field(default_factory=list)
    failures: list[grpc.StatusCode] = field(default_factory=list)
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def write_bursts(client: ApiKeysClient, outcomes: Outcomes, stop: threading.Event) -> None:
    """Creates keys and revokes some of those created, noting what was acknowledged."""
    mine: list[str] = []
    while not stop.is_set():
        key_id = ""
        try:
            if mine and random.random() < 0.3:
                key_id = mine.pop(random.randrange(len(mine)))
                client.revoke_key(key_id, tenant_id="acme", reason="test")
                with outcomes.lock:
                    outcomes.revoked.append(key_id)
            else:
                created = client.create_key("burst", ["passes:read"], tenant_id="acme")
                mine.append(created.key.id)
                with outcomes.lock:
                    outcomes.created.append((created.key.id, created.secret))
        except ApiKeysError as error:
            with outcomes.lock:
                outcomes.failures.append(error.code)
                if key_id:
                    outcomes.maybe_revoked.append(key_id)
            stop.wait(0.05)  # the channel reconnects with its own backoff; don't spin
        with outcomes.lock:
            outcomes.calls += 1


class TestWorkerDeath:
    def test_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(
        self, server_factory: ServerFactory, database_url: str
    ) -> None:
        """kill -9 of a worker under writes: acknowledged creates verify, acknowledged
        revokes hold, failed calls are UNAVAILABLE only, and a new worker takes its place."""
        server = start_processes(server_factory, database_url)
        workers = serving_workers(server)
        outcomes = Outcomes()
        stop = threading.Event()
        with separate_clients(server, WRITERS) as clients:
            threads = [
                threading.Thread(target=write_bursts, args=(client, outcomes, stop))
                for client in clients
            ]
            for thread in threads:
                thread.start()
            try:
                wait_for(lambda: outcomes.calls >= 20, "calls before the kill")
                served = connections_by_worker(server.port, workers)
                victim = max(served, key=lambda pid: len(served[pid]))
                assert served[victim], f"no writer connected to a worker: {served}"
                os.kill(victim, signal.SIGKILL)
                replacement = wait_for(
                    lambda: serving_workers(server) - workers, "a replacement worker"
                )
                after_kill = outcomes.calls
                wait_for(lambda: outcomes.calls >= after_kill + 20, "calls after the restart")
            finally:
                stop.set()
                for thread in threads:
                    thread.join()
        server.secrets.extend(secret for _, secret in outcomes.created)
        assert not alive(victim)
        assert len(replacement) == 1
        assert set(outcomes.failures) <= {grpc.StatusCode.UNAVAILABLE}, outcomes.failures
        log = server.log()
        assert f"(pid {victim}) killed by SIGKILL" in log
        assert "restarting worker" in log
        revoked = set(outcomes.revoked)
        assert outcomes.created and revoked
        uncertain = set(outcomes.maybe_revoked)
        with server.client() as client:
            for key_id, secret in outcomes.created:
                if key_id not in revoked:
                    code = client.verify(secret, tenant_id="acme").code
                    expected = {VALID, REVOKED} if key_id in uncertain else {VALID}
                    assert code in expected, f"{key_id}: {key_verifier_pb2.VerifyCode.Name(code)}"
            for key_id, secret in outcomes.created:
                if key_id in revoked:
                    assert client.get_key(key_id, tenant_id="acme").HasField("revoke_time")
                    wait_for(
                        lambda s=secret: client.verify(s, tenant_id="acme").code == REVOKED,
                        f"{key_id} verifies as REVOKED",
                        timeout=5.0,
                    )


class TestStopping:
    def test_sigterm_stops_every_worker_and_exits_zero(self, server_factory: ServerFactory) -> None:
        """SIGTERM to the parent: workers drain, exit status 0, no process left behind."""
        server = server_factory(args=PROCESSES)
        workers = serving_workers(server)
        assert server.terminate(signal.SIGTERM) == 0
        assert not any(alive(pid) for pid in workers)
        assert not any(children(pid) for pid in workers)
        log = server.log()
        assert log.count("draining") == 2
        assert "all workers stopped" in log

    def test_ctrl_c_on_the_whole_group_stops_cleanly(self, server_factory: ServerFactory) -> None:
        """A terminal's Ctrl-C (SIGINT to parent and workers alike): exit 0, no traceback."""
        server = server_factory(args=PROCESSES)
        workers = serving_workers(server)
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        assert server.terminate(signal.SIGINT) == 0
        assert not any(alive(pid) for pid in workers)
        assert "Traceback" not in server.log()


class TestStartFailures:
    def test_workers_that_cannot_start_make_the_parent_give_up(self, tmp_path: Path) -> None:
        """A port held by a socket without SO_REUSEPORT: no worker can bind; the parent
        exits non-zero with one line, within a bounded time, and leaves no worker behind."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            started = time.monotonic()
            done = run_cli(
                "serve",
                "--database-url",
                f"sqlite:///{tmp_path / 'apikeys.db'}",
                "--listen",
                f"127.0.0.1:{port}",
                *PROCESSES,
                timeout=GIVE_UP_SECONDS,
            )
            elapsed = time.monotonic() - started
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("apikeys-server: worker "), last
        assert "giving up" in last and "cannot listen on" in last, last
        assert elapsed < GIVE_UP_SECONDS
        assert "Traceback" not in done.stderr

    @pytest.mark.parametrize(
        ("args", "env", "named"),
        [
            (("--listen", "127.0.0.1:0", *PROCESSES), {}, "port"),
            (("--processes", "0"), {}, "--processes 0 (or APIKEYS_PROCESSES) must be between"),
            ((), {"APIKEYS_PROCESSES": "65"}, "APIKEYS_PROCESSES=65 (or --processes) must be"),
        ],
        ids=["port-0", "zero", "too-many"],
    )
    def test_bad_process_settings_exit_2(
        self, tmp_path: Path, args: tuple[str, ...], env: dict[str, str], named: str
    ) -> None:
        """Refused before anything starts: exit status 2 and one line that names the cause."""
        url = f"sqlite:///{tmp_path / 'apikeys.db'}"
        listen = () if "--listen" in args else ("--listen", f"127.0.0.1:{free_port()}")
        done = run_cli("serve", "--database-url", url, *listen, *args, env=env)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], lines
        assert not (tmp_path / "apikeys.db").exists()
