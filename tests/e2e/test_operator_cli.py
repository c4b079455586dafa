"""The ``apikeys`` operator command, run as a subprocess against a real server.

Every run's output is kept; the last test checks that no secret appears anywhere except on
stdout of the one command that made it (``keys create``/``keys rotate``).
"""

import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import SECRET_LINE, ServerProcess, _executable, clean_env

pytestmark = pytest.mark.e2e

TENANT = "acme"
OTHER_TENANT = "globex"


def apikeys_command() -> list[str]:
    script = _executable("apikeys")
    return [str(script)] if script else [sys.executable, "-m", "apikeys_client.cli"]


@dataclass
class Run:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    shows_secret: str = ""  # the one secret this run may print (on stdout)


RUNS: list[Run] = []
SECRETS: list[str] = []


def apikeys(
    server: ServerProcess,
    *args: str,
    key: str | None = None,
    stdin: str = "",
    env: Mapping[str, str] | None = None,
) -> Run:
    environment = {"APIKEYS_TARGET": server.target, "APIKEYS_API_KEY": key or server.admin_key}
    environment.update(env or {})
    result = subprocess.run(
        [*apikeys_command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(environment),
        timeout=60,
        check=False,
    )
    run = Run(args, result.returncode, result.stdout, result.stderr)
    RUNS.append(run)
    assert "Traceback" not in run.stderr, run.stderr
    return run


def verify(server: ServerProcess, *args: str, stdin: str) -> Run:
    """``apikeys verify`` for tenant TENANT (``-o json`` may lead ``args``)."""
    before = [a for a in args if a in ("-o", "json")]
    after = [a for a in args if a not in ("-o", "json")]
    return apikeys(server, *before, "verify", "--tenant", TENANT, *after, stdin=stdin)


def ok(run: Run) -> Run:
    assert run.returncode == 0, run.stderr
    return run


def create(server: ServerProcess, name: str, *scopes: str, tenant: str = TENANT) -> tuple[str, str]:
    """(key id, secret) of a key made with ``keys create``."""
    args = ["keys", "create", name, "--tenant", tenant]
    for scope in scopes:
        args += ["--scope", scope]
    run = ok(apikeys(server, *args))
    assert SECRET_LINE.match(run.stdout), "stdout holds only the secret"
    assert "will not be shown again" in run.stderr
    secret = run.stdout.strip()
    run.shows_secret = server.remember(secret)
    SECRETS.append(secret)
    key_id = run.stderr.split("Created ", 1)[1].split(" ", 1)[0]
    return key_id, secret


def as_json(run: Run) -> dict:
    ok(run)
    return json.loads(run.stdout)


def test_scopes(e2e_server: ServerProcess) -> None:
    table = ok(apikeys(e2e_server, "scopes")).stdout
    assert table.splitlines()[0].split() == ["SCOPE", "DESCRIPTION"]
    assert "passes:read" in table
    document = as_json(apikeys(e2e_server, "--output", "json", "scopes"))
    assert {"name": "apikeys:manage"} in [{"name": s["name"]} for s in document["scopes"]]


def test_create_list_get(e2e_server: ServerProcess) -> None:
    key_id, _ = create(e2e_server, "billing", "passes:read")
    listing = ok(apikeys(e2e_server, "keys", "list", "--tenant", TENANT)).stdout
    header, *rows = listing.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "STATE", "SCOPES"]
    row = next(row for row in rows if row.startswith(key_id))
    assert "ACTIVE" in row and "\x1b[" not in row  # no colour when stdout is not a terminal
    assert "just now" in row
    shown = ok(apikeys(e2e_server, "keys", "get", key_id, "--tenant", TENANT)).stdout
    assert "id:" in shown and key_id in shown and "passes:read" in shown
    document = as_json(apikeys(e2e_server, "-o", "json", "keys", "get", key_id, "--tenant", TENANT))
    assert document["id"] == key_id
    assert document["tenantId"] == TENANT
    assert document["state"] == "KEY_STATE_ACTIVE"
    listed = as_json(apikeys(e2e_server, "-o", "json", "keys", "list", "--tenant", TENANT))
    assert key_id in [key["id"] for key in listed["keys"]]


def test_create_json_includes_secret(e2e_server: ServerProcess) -> None:
    run = apikeys(
        e2e_server,
        "-o",
        "json",
        "keys",
        "create",
        "json",
        "--tenant",
        TENANT,
        "--scope",
        "passes:read",
    )
    document = as_json(run)
    run.shows_secret = e2e_server.remember(document["secret"])
    SECRETS.append(document["secret"])
    assert document["key"]["name"] == "json"
    assert document["key"]["createTime"]


def test_update(e2e_server: ServerProcess) -> None:
    key_id, _ = create(e2e_server, "rename-me", "passes:read")
    document = as_json(
        apikeys(
            e2e_server,
            "-o",
            "json",
            "keys",
            "update",
            key_id,
            "--tenant",
            TENANT,
            "--name",
            "renamed",
            "--scope",
            "passes:write",
        )
    )
    assert document["name"] == "renamed"
    assert document["scopes"] == ["passes:write"]


def test_verify_exit_codes(e2e_server: ServerProcess) -> None:
    _, secret = create(e2e_server, "verify-me", "passes:read")
    valid = apikeys(
        e2e_server, "verify", "--tenant", TENANT, "--scope", "passes:read", stdin=secret + "\n"
    )
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.startswith("valid:")
    short = apikeys(
        e2e_server, "verify", "--tenant", TENANT, "--scope", "passes:write", stdin=secret
    )
    assert short.returncode == 4
    assert "INSUFFICIENT_SCOPE" in short.stdout and "passes:write" in short.stdout
    garbage = verify(e2e_server, stdin="wc_test_nonsense\n")
    assert garbage.returncode == 3
    document = json.loads(verify(e2e_server, "-o", "json", stdin="x").stdout)
    assert document["code"] == "VERIFY_CODE_MALFORMED"
    assert document["httpStatus"] == 401


def test_rotate_with_overlap_then_revoke(e2e_server: ServerProcess) -> None:
    old_id, old_secret = create(e2e_server, "rotating", "passes:read")
    run = ok(apikeys(e2e_server, "keys", "rotate", old_id, "--tenant", TENANT, "--overlap", "24h"))
    assert SECRET_LINE.match(run.stdout)
    new_secret = run.stdout.strip()
    run.shows_secret = e2e_server.remember(new_secret)
    SECRETS.append(new_secret)
    assert "will not be shown again" in run.stderr
    assert f"apikeys keys wait-unused {old_id}" in run.stderr
    assert f"apikeys keys revoke {old_id}" in run.stderr
    # Both work during the overlap.
    assert verify(e2e_server, stdin=old_secret).returncode == 0
    assert verify(e2e_server, stdin=new_secret).returncode == 0
    old = as_json(apikeys(e2e_server, "-o", "json", "keys", "get", old_id, "--tenant", TENANT))
    assert old["replacedBy"]
    assert old["expireTime"]
    revoked = ok(
        apikeys(e2e_server, "keys", "revoke", old_id, "--tenant", TENANT, "--reason", "rotated")
    )
    assert "REVOKED" in revoked.stdout
    assert verify(e2e_server, stdin=old_secret).returncode == 3


def test_wait_unused_times_out_while_in_use(e2e_server: ServerProcess) -> None:
    idle_id, _ = create(e2e_server, "idle", "passes:read")
    idle = apikeys(
        e2e_server,
        "keys",
        "wait-unused",
        idle_id,
        "--tenant",
        TENANT,
        "--quiet-for",
        "10m",
        "--timeout",
        "5s",
        "--poll",
        "1s",
    )
    assert idle.returncode == 0, idle.stderr  # never used: quiet at once
    assert "never used" in idle.stderr
    key_id, secret = create(e2e_server, "busy", "passes:read")
    assert verify(e2e_server, stdin=secret).returncode == 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # last-used times are written in batches
        got = as_json(apikeys(e2e_server, "-o", "json", "keys", "get", key_id, "--tenant", TENANT))
        if "lastUsedTime" in got:
            break
        time.sleep(0.5)
    run = apikeys(
        e2e_server,
        "keys",
        "wait-unused",
        key_id,
        "--tenant",
        TENANT,
        "--quiet-for",
        "1h",
        "--timeout",
        "1s",
        "--poll",
        "1s",
    )
    assert run.returncode == 5, run.stderr
    assert "still in use" in run.stderr


def test_service_refusals_exit_1(e2e_server: ServerProcess) -> None:
    run = apikeys(e2e_server, "keys", "get", "key_doesnotexist", "--tenant", TENANT)
    assert run.returncode == 1
    assert run.stdout == ""
    assert "KEY_NOT_FOUND" in run.stderr
    _, reader = create(e2e_server, "reader", "apikeys:read", tenant=TENANT)
    denied = apikeys(e2e_server, "keys", "create", "x", "--scope", "passes:read", key=reader)
    assert denied.returncode == 1
    assert "PERMISSION_DENIED" in denied.stderr
    wrong = apikeys(e2e_server, "scopes", key="wc_test_" + "A" * 38)
    assert wrong.returncode == 1
    assert "UNAUTHENTICATED" in wrong.stderr


def test_usage_errors_exit_2(e2e_server: ServerProcess, tmp_path: Path) -> None:
    no_key = apikeys(e2e_server, "scopes", env={"APIKEYS_API_KEY": ""})
    assert no_key.returncode == 2 and "APIKEYS_API_KEY" in no_key.stderr
    assert apikeys(e2e_server, "keys", "update", "key_x").returncode == 2
    assert apikeys(e2e_server, "keys", "rotate", "key_x", "--overlap", "soon").returncode == 2
    assert verify(e2e_server, stdin="").returncode == 2
    assert apikeys(e2e_server, "keys", "frobnicate").returncode == 2
    # The caller key from a file works, and an argument for it does not exist.
    key_file = tmp_path / "key"
    key_file.write_text(e2e_server.admin_key + "\n")
    ok(apikeys(e2e_server, "--api-key-file", str(key_file), "scopes", env={"APIKEYS_API_KEY": ""}))
    assert apikeys(e2e_server, "--api-key", e2e_server.admin_key, "scopes").returncode == 2


def test_every_command_has_help_with_example(e2e_server: ServerProcess) -> None:
    commands = [
        ["scopes"],
        ["events"],
        ["verify"],
        ["leaks", "report"],
        *[
            ["keys", name]
            for name in ("create", "list", "get", "update", "rotate", "revoke", "wait-unused")
        ],
    ]
    for command in commands:
        run = ok(apikeys(e2e_server, *command, "--help"))
        assert "Example:" in run.stdout, command
        assert f"apikeys {' '.join(command)}" in run.stdout, command


def test_events(e2e_server: ServerProcess) -> None:
    key_id, _ = create(e2e_server, "audited", "passes:read")
    ok(apikeys(e2e_server, "keys", "revoke", key_id, "--tenant", TENANT))
    table = ok(apikeys(e2e_server, "events", "--tenant", TENANT, "--key", key_id)).stdout
    assert "REVOKED" in table and "CREATED" in table
    document = as_json(
        apikeys(e2e_server, "-o", "json", "events", "--tenant", TENANT, "--key", key_id)
    )
    assert [e["action"] for e in document["events"]] == [
        "EVENT_ACTION_REVOKED",
        "EVENT_ACTION_CREATED",
    ]


def test_leaks_report_across_tenants(e2e_server: ServerProcess) -> None:
    """A tenant key revokes its own tenant's leaked keys only; a platform key any tenant's."""
    _, acme_admin = create(e2e_server, "acme-admin", "apikeys:manage", "apikeys:read")
    acme_id, acme_key = create(e2e_server, "acme-leaky", "passes:read")
    globex_id, globex_key = create(e2e_server, "globex-leaky", "passes:read", tenant=OTHER_TENANT)
    url = "https://github.com/acme/app/commit/0a1b"
    run = ok(
        apikeys(
            e2e_server,
            "leaks",
            "report",
            "--source",
            "gitleaks",
            "--url",
            url,
            key=acme_admin,
            stdin=f"{acme_key}\n{globex_key}\nnot-a-key\n",
        )
    )
    header, *rows = run.stdout.splitlines()
    assert header.split() == ["#", "HINT", "OUTCOME", "KEY"]
    assert [row.split()[2] for row in rows] == ["REVOKED", "NOT_FOUND", "MALFORMED"]
    assert acme_id in rows[0] and globex_id not in run.stdout
    assert verify(e2e_server, stdin=acme_key).returncode == 3
    # The tripwire: the revoked key was presented; list and get flag it once written (batched).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listing = ok(apikeys(e2e_server, "keys", "list", "--all", "--tenant", TENANT)).stdout
        row = next(row for row in listing.splitlines() if row.startswith(acme_id))
        if "!presented x1" in row:
            break
        time.sleep(0.5)
    assert "!presented x1" in row
    shown = ok(apikeys(e2e_server, "keys", "get", acme_id, "--tenant", TENANT)).stdout
    assert re.search(r"TRIPWIRE: +presented 1 times after it stopped working", shown)
    other = apikeys(e2e_server, "verify", "--tenant", OTHER_TENANT, stdin=globex_key)
    assert other.returncode == 0
    acme = as_json(apikeys(e2e_server, "-o", "json", "keys", "get", acme_id, "--tenant", TENANT))
    assert acme["leakSource"] == "gitleaks" and acme["leakUrl"] == url and acme["leakTime"]
    events = as_json(
        apikeys(e2e_server, "-o", "json", "events", "--tenant", TENANT, "--key", acme_id)
    )
    actions = [event["action"] for event in events["events"]]
    assert actions[0] == "EVENT_ACTION_PRESENTED_AFTER_REVOCATION"  # the tripwire, newest
    assert "EVENT_ACTION_LEAKED" in actions
    # The platform key, scanning a text: finds the key (checksum checked) and revokes it.
    text = f"commit 0a1b\n+API_KEY={globex_key}\n+OTHER=ak_{'A' * 38}\n"
    document = as_json(apikeys(e2e_server, "-o", "json", "leaks", "report", "--scan", stdin=text))
    assert document["results"] == [
        {
            "hint": document["results"][0]["hint"],
            "outcome": "LEAK_OUTCOME_REVOKED",
            "keyId": globex_id,
        }
    ]
    # Nothing found to report is a usage error.
    assert apikeys(e2e_server, "leaks", "report", "--scan", stdin="nothing").returncode == 2


def test_no_secret_in_any_output(e2e_server: ServerProcess) -> None:
    """Runs last: a secret appears only on stdout of the run that made it."""
    secrets = [*SECRETS, e2e_server.admin_key]
    assert RUNS and SECRETS
    for run in RUNS:
        for secret in secrets:
            body = secret.rsplit("_", 1)[-1]
            assert body not in run.stderr, f"secret in stderr of {run.args}"
            if secret != run.shows_secret:
                assert body not in run.stdout, f"secret in stdout of {run.args}"
    RUNS.clear()
    SECRETS.clear()
