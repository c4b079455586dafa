"""The ``apikeys-server`` command line: migrate, admin-key, and how it fails."""

import re
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from apikeys.v1 import key_verifier_pb2
from apikeys_client import NotFound, PermissionDenied
from tests.e2e.conftest import (
    SECRET_LINE,
    ServerProcess,
    assert_no_secrets,
    create_admin_key,
    free_port,
    run_cli,
    start_server,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server over SQLite for the tests that use keys made by `admin-key`."""
    directory = tmp_path_factory.mktemp("cli")
    server = start_server(f"sqlite:///{directory / 'apikeys.db'}", directory)
    try:
        yield server
    finally:
        server.check_stopped_cleanly()


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}


def assert_clean_failure(result, status: int = 1) -> None:
    """Failed with ``status``, one message from the command, no traceback, nothing on stdout."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


class TestMigrate:
    def test_creates_schema_in_empty_file(self, tmp_path: Path) -> None:
        """`migrate` on an empty SQLite file creates the tables and exits 0."""
        path = tmp_path / "empty.db"
        path.touch()
        result = run_cli("migrate", "--database-url", f"sqlite:///{path}")
        assert result.returncode == 0, result.stderr
        assert "schema is up to date" in result.stderr
        assert result.stdout == ""
        assert {"api_keys", "key_events", "alembic_version"} <= tables(path)

    def test_is_idempotent(self, tmp_path: Path) -> None:
        """A second `migrate` on an up-to-date database changes nothing and exits 0."""
        url = f"sqlite:///{tmp_path / 'apikeys.db'}"
        assert run_cli("migrate", "--database-url", url).returncode == 0
        with sqlite3.connect(tmp_path / "apikeys.db") as connection:
            before = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        again = run_cli("migrate", "--database-url", url)
        with sqlite3.connect(tmp_path / "apikeys.db") as connection:
            after = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        assert again.returncode == 0, again.stderr
        assert before == after
        assert len(after) == 1

    def test_reads_database_url_from_environment(self, tmp_path: Path) -> None:
        """Without --database-url, `migrate` uses APIKEYS_DATABASE_URL."""
        path = tmp_path / "from-env.db"
        result = run_cli("migrate", env={"APIKEYS_DATABASE_URL": f"sqlite:///{path}"})
        assert result.returncode == 0, result.stderr
        assert "api_keys" in tables(path)

    @pytest.mark.postgres
    def test_postgres_up_to_date(self, postgres_url: str) -> None:
        """`migrate` on PostgreSQL succeeds and is safe to repeat."""
        result = run_cli("migrate", "--database-url", postgres_url)
        assert result.returncode == 0, result.stderr
        assert "schema is up to date" in result.stderr


class TestAdminKey:
    def test_prints_only_the_secret(self, tmp_path: Path) -> None:
        """stdout is the secret and a newline; stderr names the key id, never the secret."""
        path = tmp_path / "apikeys.db"
        result = run_cli("admin-key", "--database-url", f"sqlite:///{path}")
        assert result.returncode == 0, result.stderr
        assert SECRET_LINE.match(result.stdout)
        secret = result.stdout.strip()
        assert re.search(r"created key_[a-z0-9]+ in tenant _platform", result.stderr)
        assert_no_secrets(result.stderr, [secret], "stderr")
        stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
        assert secret.rsplit("_", 1)[-1].encode() not in stored

    def test_tenant_admin_manages_only_its_tenant(self, cli_server: ServerProcess) -> None:
        """`admin-key --tenant acme --name ops` makes a key that acts on acme and nothing else."""
        server = cli_server
        ops = server.remember(
            create_admin_key(server.database_url, "--tenant", "acme", "--name", "ops")
        )
        with server.client() as platform:
            foreign = platform.create_key("svc", ["passes:read"], tenant_id="globex")
        with server.client(ops) as client:
            whoami = client.verify(ops)
            own = client.create_key("svc", ["passes:read"])
            listed = [k.id for k in client.list_keys()]
            with pytest.raises(PermissionDenied) as other_tenant:
                client.create_key("svc", ["passes:read"], tenant_id="globex")
            with pytest.raises(NotFound):
                client.get_key(foreign.key.id)
            with pytest.raises(NotFound):
                client.revoke_key(foreign.key.id)
            foreign_answer = client.verify(foreign.secret)
        assert whoami.code == key_verifier_pb2.VERIFY_CODE_VALID
        assert (whoami.tenant_id, whoami.name) == ("acme", "ops")
        assert sorted(whoami.scopes) == ["apikeys:manage", "apikeys:read", "apikeys:verify"]
        assert own.key.tenant_id == "acme"
        assert set(listed) == {own.key.id, whoami.key_id}
        assert other_tenant.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert foreign_answer.code == key_verifier_pb2.VERIFY_CODE_NOT_FOUND

    def test_scope_flag_limits_the_key(self, cli_server: ServerProcess) -> None:
        """`admin-key --scope apikeys:read` makes a key that may read but not write."""
        server = cli_server
        reader = server.remember(
            create_admin_key(server.database_url, "--tenant", "initech", "--scope", "apikeys:read")
        )
        with server.client(reader) as client:
            assert len(list(client.list_keys())) == 1
            with pytest.raises(PermissionDenied):
                client.create_key("svc", ["passes:read"])

    def test_unknown_scope_fails_cleanly(self, tmp_path: Path) -> None:
        """An unknown --scope exits 1 naming it, and prints no secret."""
        url = f"sqlite:///{tmp_path / 'apikeys.db'}"
        result = run_cli("admin-key", "--database-url", url, "--scope", "passes:wirte")
        assert_clean_failure(result)
        assert "passes:wirte" in result.stderr

    def test_bad_tenant_fails_cleanly(self, tmp_path: Path) -> None:
        """A tenant id that is not a valid id exits 1 with a message, no secret."""
        url = f"sqlite:///{tmp_path / 'apikeys.db'}"
        result = run_cli("admin-key", "--database-url", url, "--tenant", "no spaces please")
        assert_clean_failure(result)
        assert "tenant" in result.stderr


class TestBadUsage:
    @pytest.mark.parametrize(
        "argv",
        [
            [],
            ["serve", "--bogus"],
            ["serve", "--workers", "many"],
        ],
        ids=["no-command", "unknown-flag", "bad-int"],
    )
    def test_bad_flags_exit_2(self, argv: list[str]) -> None:
        """Wrong command-line usage exits 2 with the usage line, not a traceback."""
        result = run_cli(*argv)
        assert_clean_failure(result, status=2)
        assert "usage: apikeys-server" in result.stderr

    def test_bad_environment_value_exits_2(self) -> None:
        """An APIKEYS_* variable that does not parse exits 2 naming the variable."""
        result = run_cli("migrate", env={"APIKEYS_WORKERS": "many"})
        assert_clean_failure(result, status=2)
        assert "APIKEYS_WORKERS" in result.stderr

    @pytest.mark.parametrize(
        ("env", "line"),
        [
            (
                {"APIKEYS_CACHE_TTL_SECONDS": "-1"},
                "APIKEYS_CACHE_TTL_SECONDS=-1 must be between 0 and 86400 (seconds)",
            ),
            ({"APIKEYS_CACHE_SIZE": "-5"}, "APIKEYS_CACHE_SIZE=-5 must be between 0 and 10000000"),
            (
                {"APIKEYS_LAST_USED_FLUSH_SECONDS": "0"},
                "APIKEYS_LAST_USED_FLUSH_SECONDS=0 must be between 0.01 and 86400 (seconds)",
            ),
            (
                {"APIKEYS_MIGRATE_ON_START": "maybe"},
                "APIKEYS_MIGRATE_ON_START='maybe' must be one of "
                "true, false, 1, 0, yes, no, on, off",
            ),
        ],
        ids=["ttl", "cache-size", "flush", "bool"],
    )
    def test_serve_refuses_out_of_range_settings(
        self, tmp_path: Path, env: dict[str, str], line: str
    ) -> None:
        """The user reports: `serve` exits 2 with exactly one line, before touching the database."""
        url = f"sqlite:///{tmp_path / 'apikeys.db'}"
        result = run_cli("serve", "--database-url", url, "--listen", "127.0.0.1:0", env=env)
        assert_clean_failure(result, status=2)
        assert result.stderr.splitlines() == [f"apikeys-server: {line}"]
        assert not (tmp_path / "apikeys.db").exists()

    @pytest.mark.parametrize(
        ("argv", "env", "words"),
        [
            (["--listen", "nowhere"], {}, "must be HOST:PORT"),
            (["--idle-minutes", "0"], {}, "must be 1..1440"),
            ([], {"APIKEYS_CONSOLE_TLS": "maybe"}, "APIKEYS_CONSOLE_TLS='maybe'"),
            (["--tls-cert-file", "/tmp/c.pem"], {}, "go together"),
        ],
        ids=["listen", "idle", "bool-variable", "half-pair"],
    )
    def test_console_refuses_bad_settings(
        self, argv: list[str], env: dict[str, str], words: str
    ) -> None:
        """`console` exits 2 with one line naming the bad setting, before serving anything."""
        result = run_cli("console", *argv, env=env)
        assert_clean_failure(result, status=2)
        assert len(result.stderr.splitlines()) == 1 and words in result.stderr

    def test_serve_help_shows_variable_default_and_range(self) -> None:
        """Each flag and each variable-only setting in `serve --help`."""
        result = run_cli("serve", "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        processes = (
            "--processes PROCESSES server processes on the address "
            "($APIKEYS_PROCESSES; default 1; between 1 and 64)"
        )
        assert processes in text
        assert "--tls-client-ca-file FILE" in text
        assert "$APIKEYS_CACHE_TTL_SECONDS; default 300; between 0 and 86400 (seconds)" in text


class TestUnreachableDatabase:
    @pytest.mark.parametrize("command", ["migrate", "serve"])
    def test_postgres_refusing_connections(self, command: str) -> None:
        """A PostgreSQL URL nobody answers on exits 1 with one clear line, password hidden."""
        url = f"postgresql://apikeys:hunter2pw@127.0.0.1:{free_port()}/apikeys"
        result = run_cli(command, "--database-url", url, *listen_args(command))
        assert_clean_failure(result)
        assert "cannot use postgresql://apikeys:***@127.0.0.1" in result.stderr
        assert "hunter2pw" not in result.stderr

    def test_sqlite_in_missing_directory(self, tmp_path: Path) -> None:
        """A SQLite file that cannot be opened exits 1 naming it, with no traceback."""
        url = f"sqlite:///{tmp_path / 'missing' / 'apikeys.db'}"
        result = run_cli("admin-key", "--database-url", url)
        assert_clean_failure(result)
        assert "unable to open database file" in result.stderr

    def test_unsupported_database_kind(self) -> None:
        """A URL for a database this service does not support exits 1 with a message."""
        result = run_cli("migrate", "--database-url", "mysql://u@127.0.0.1/apikeys")
        assert_clean_failure(result)
        assert "cannot use mysql://" in result.stderr


def listen_args(command: str) -> list[str]:
    return ["--listen", "127.0.0.1:0"] if command == "serve" else []


class TestServeListen:
    def test_address_in_use_fails_cleanly(self, tmp_path: Path) -> None:
        """`serve` on an address another socket holds exits 1 saying it cannot listen."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            address = f"127.0.0.1:{taken.getsockname()[1]}"
            result = run_cli(
                "serve",
                "--database-url",
                f"sqlite:///{tmp_path / 'apikeys.db'}",
                "--listen",
                address,
            )
        assert_clean_failure(result)
        assert f"cannot listen on {address}" in result.stderr
