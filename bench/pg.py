"""PostgreSQL helpers shared by the propagation benchmark and tests/e2e/test_replicas.py.

A server process's ``LISTEN`` connection is found by the local TCP ports of that process
(its socket inodes in ``/proc/<pid>/fd``, their ports in ``/proc/net/tcp``), matched with
``pg_stat_activity.client_port``: several replicas listen on one database, only one is killed.
"""

import os
import time
from pathlib import Path

from sqlalchemy import Engine, text


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    directory = Path(f"/proc/{pid}/fd")
    for entry in directory.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def local_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` holds (Linux)."""
    inodes = _socket_inodes(pid)
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listener_backends(admin: Engine, database: str, pid: int) -> list[int]:
    """Backend pids of the ``LISTEN`` connections that process ``pid`` holds on ``database``."""
    ports = local_ports(pid)
    with admin.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT pid, client_port FROM pg_stat_activity "
                "WHERE datname = :database AND query LIKE 'LISTEN %'"
            ),
            {"database": database},
        ).all()
    return [int(backend) for backend, port in rows if port in ports]


def kill_listener(admin: Engine, database: str, pid: int, bound: float = 5.0) -> int:
    """Waits until process ``pid`` listens (again), then ``pg_terminate_backend``s that
    connection and waits until the backend has exited (a change committed after this returns
    cannot be notified to it); returns the killed backend's pid. TimeoutError past ``bound``."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        backends = listener_backends(admin, database, pid)
        if backends:
            break
        time.sleep(0.01)
    else:
        raise TimeoutError(f"process {pid} has no LISTEN connection after {bound:.1f} s")
    backend = backends[0]
    with admin.connect() as connection:
        connection.execute(text("SELECT pg_terminate_backend(:pid, 0)"), {"pid": backend})
        while time.monotonic() < deadline:
            gone = connection.execute(
                text("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = :pid)"),
                {"pid": backend},
            ).scalar_one()
            if gone:
                return backend
            time.sleep(0.002)
    raise TimeoutError(f"backend {backend} still there {bound:.1f} s after pg_terminate_backend")
