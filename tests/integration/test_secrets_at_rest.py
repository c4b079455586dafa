"""No secret at rest: not in the SQLite file (nor its WAL), any PostgreSQL row, or the logs."""

import logging
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from apikeys_client import Unauthenticated
from apikeys_server.domain.key_format import RANDOM_LENGTH
from tests.support import FakeClock, RunningServer, running_server, server_settings

# Any run of this many characters of a secret's random part is a leak (the hint shows 4).
WINDOW = 8


def _needles(secret: str) -> list[bytes]:
    """The secret, its random part, and every WINDOW-long slice of that random part."""
    random_part = secret.rsplit("_", 1)[1][:RANDOM_LENGTH]
    assert len(random_part) == RANDOM_LENGTH
    slices = [random_part[i : i + WINDOW] for i in range(RANDOM_LENGTH - WINDOW + 1)]
    return [secret.encode(), random_part.encode(), *(s.encode() for s in slices)]


def _exercise(server: RunningServer) -> tuple[list[str], list[str]]:
    """Creates, verifies and revokes keys in two tenants; answers (secrets, key ids)."""
    secrets = [server.admin_key]
    ids = [server.admin_key_id]
    with server.client() as client:
        for tenant in ("acme", "globex"):
            for i in range(4):
                created = client.create_key(
                    f"svc-{i}", ["passes:read", "customers:write"], tenant_id=tenant
                )
                secrets.append(created.secret)
                ids.append(created.key.id)
                assert client.verify(created.secret, ["passes:read"], tenant_id=tenant).valid
                client.verify(created.secret, ["passes:write"], tenant_id=tenant)
                if i % 2:
                    client.revoke_key(created.key.id, tenant_id=tenant, reason="test")
                    client.verify(created.secret, tenant_id=tenant)
    assert server.app.services.last_used.flush() > 0
    return secrets, ids


def _assert_absent(haystack: bytes, secrets: list[str], where: str) -> None:
    for secret in secrets:
        for needle in _needles(secret):
            assert needle not in haystack, f"part of a secret found in {where}"


def _sqlite_files(path: Path) -> dict[str, bytes]:
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    return {f.name: f.read_bytes() for f in files if f.exists()}


class TestSqliteFile:
    def test_database_and_wal_never_hold_a_secret(self, tmp_path: Path, clock: FakeClock) -> None:
        """After create, verify and revoke, no file of the database holds any part of a secret."""
        path = tmp_path / "apikeys.db"
        with running_server(server_settings(f"sqlite:///{path}"), clock) as server:
            secrets, ids = _exercise(server)
            live = _sqlite_files(path)
        at_rest = _sqlite_files(path)
        # Sanity: the files read really hold the keys (their public ids are stored).
        everything = b"".join(live.values())
        assert all(key_id.encode() in everything for key_id in ids)
        assert any(name.endswith("-wal") for name in live)
        for name, content in {**live, **{f"{n} (stopped)": c for n, c in at_rest.items()}}.items():
            _assert_absent(content, secrets, name)


class TestPostgresRows:
    @pytest.mark.postgres
    def test_no_column_of_any_row_holds_a_secret(self, postgres_url: str, clock: FakeClock) -> None:
        """Every row of every table, cast to text, holds no part of any secret."""
        with running_server(server_settings(postgres_url), clock) as server:
            secrets, ids = _exercise(server)
        engine = create_engine(postgres_url)
        try:
            tables = inspect(engine).get_table_names()
            assert {"api_keys", "key_events"} <= set(tables)
            rows: list[str] = []
            with engine.connect() as connection:
                for table in tables:
                    rows.extend(
                        connection.execute(text(f'SELECT t::text FROM "{table}" AS t')).scalars()
                    )
                # Binary columns also as hex and raw text, in case a secret were stored as bytes.
                rows.extend(
                    connection.execute(
                        text(
                            "SELECT encode(digest, 'hex') || encode(digest, 'escape') FROM api_keys"
                        )
                    ).scalars()
                )
        finally:
            engine.dispose()
        dump = "\n".join(rows).encode()
        assert all(key_id.encode() in dump for key_id in ids)
        _assert_absent(dump, secrets, "PostgreSQL")


class TestLogs:
    def test_server_logs_never_hold_a_secret(
        self, sqlite_url: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """At DEBUG level, nothing the server logs while keys are used holds part of a secret."""
        with caplog.at_level(logging.DEBUG):
            with running_server(server_settings(sqlite_url), clock) as server:
                secrets, _ = _exercise(server)
                mistyped = "ak_" + secrets[1][3:-1] + "X"
                with server.client(mistyped) as client, pytest.raises(Unauthenticated) as refused:
                    client.list_scopes()
            text_logged = "\n".join(
                record.getMessage() + str(record.exc_info or "") for record in caplog.records
            )
        assert caplog.records  # the server did log (start/stop), so the check means something
        _assert_absent(text_logged.encode(), secrets, "the server log")
        _assert_absent(str(refused.value).encode(), secrets, "the error sent to a caller")
