"""``apikeys``: the operator command, over the gRPC API (never the database).

Exit codes: 0 success; 1 the service refused (its message and reason code on stderr);
2 usage; ``verify``: 3 the key is refused (401), 4 it lacks a required scope (403);
``keys wait-unused``: 5 the key was still in use when ``--timeout`` passed.
"""

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from apikeys.v1 import api_key_pb2, key_manager_pb2, key_verifier_pb2
from apikeys_client._client import ApiKeysClient
from apikeys_client._errors import ApiKeysError
from apikeys_client._tls import tls_credentials
from apikeys_client.cli import _output as out
from apikeys_client.cli._durations import DURATION
from apikeys_client.key_pattern import find_keys

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_KEY_REFUSED = 3
EXIT_INSUFFICIENT_SCOPE = 4
EXIT_STILL_IN_USE = 5
LEAK_BATCH = 1000  # RevokeLeakedKeys takes at most this many secrets a call
SECRET_WARNING = "This secret is shown once and will not be shown again: store it now."

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Settings:
    target: str
    api_key_file: Path | None
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    tls: bool
    timeout: float
    output: str

    @property
    def json(self) -> bool:
        return self.output == "json"

    def caller_key(self) -> str:
        if self.api_key_file is not None:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
            if not key:
                raise click.UsageError(f"{self.api_key_file} is empty")
            return key
        key = os.environ.get("APIKEYS_API_KEY", "").strip()
        if not key:
            raise click.UsageError(
                "no caller key: set APIKEYS_API_KEY or pass --api-key-file "
                "(never the key itself as an argument)"
            )
        return key

    def client(self) -> ApiKeysClient:
        credentials = None
        if self.tls or self.ca_file or self.cert_file or self.key_file:
            try:
                credentials = tls_credentials(self.ca_file, self.cert_file, self.key_file)
            except (ValueError, OSError) as error:
                raise click.UsageError(str(error)) from None
        return ApiKeysClient(
            self.target, self.caller_key(), timeout=self.timeout, credentials=credentials
        )


pass_settings = click.make_pass_decorator(Settings)
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--target",
    envvar="APIKEYS_TARGET",
    default="localhost:50051",
    show_default=True,
    help="The service's host:port (env APIKEYS_TARGET).",
)
@click.option(
    "--api-key-file",
    type=FILE,
    help="Read the caller key from this file; otherwise from the APIKEYS_API_KEY variable.",
)
@click.option("--tls", is_flag=True, help="Use TLS with the system's roots.")
@click.option("--tls-ca-file", type=FILE, help="CA(s) for the server's certificate (TLS).")
@click.option("--tls-cert-file", type=FILE, help="Client certificate (mTLS), with --tls-key-file.")
@click.option("--tls-key-file", type=FILE, help="Client private key (mTLS).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per call.")
@click.option(
    "--output",
    "-o",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table: for people; json: one JSON document (the proto's JSON field names).",
)
@click.pass_context
def cli(
    ctx: click.Context,
    target: str,
    api_key_file: Path | None,
    tls: bool,
    tls_ca_file: Path | None,
    tls_cert_file: Path | None,
    tls_key_file: Path | None,
    timeout: float,
    output: str,
) -> None:
    """Manage and check apikeys keys over the service's gRPC API.

    The caller key comes from APIKEYS_API_KEY or --api-key-file. Example:

    \b
      export APIKEYS_TARGET=keys.internal:50051 APIKEYS_API_KEY=$(cat ~/.apikeys)
      apikeys keys list --tenant acme

    Exit codes: 0 success, 1 the service refused, 2 usage; verify: 3 refused, 4 missing scope;
    keys wait-unused: 5 still in use at --timeout.
    """
    ctx.obj = Settings(
        target, api_key_file, tls_ca_file, tls_cert_file, tls_key_file, tls, timeout, output
    )


TENANT = click.option(
    "--tenant", default="", help="The tenant (a platform key must name one; a tenant key: its own)."
)


# -- scopes -----------------------------------------------------------------------------------


@cli.command()
@pass_settings
def scopes(settings: Settings) -> None:
    """The scopes keys may be given.

    \b
    Example:
      apikeys scopes
    """
    with settings.client() as client:
        found = client.list_scopes()
    if settings.json:
        out.emit_json({"scopes": [out.as_dict(scope) for scope in found]})
        return
    click.echo(out.table(["SCOPE", "DESCRIPTION"], [(s.name, s.description) for s in found]))


# -- keys -------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Create, list, show, update, rotate and revoke keys."""


def _key_rows(found: list[api_key_pb2.ApiKey]) -> list[list[str]]:
    now = datetime.now(UTC)
    return [
        [
            key.id,
            key.name,
            out.state(key) + _tripped(key),
            ",".join(key.scopes),
            key.hint,
            out.when(key.create_time, now),
            out.when(key.last_used_time, now),
            out.when(key.expire_time, now),
        ]
        for key in found
    ]


def _tripped(key: api_key_pb2.ApiKey) -> str:
    """A flag for a key presented after it stopped working (someone still holds it)."""
    if not key.presented_after_revocation_count:
        return ""
    return click.style(f" !presented x{key.presented_after_revocation_count}", fg="red", bold=True)


KEY_HEADERS = ["ID", "NAME", "STATE", "SCOPES", "HINT", "CREATED", "LAST USED", "EXPIRES"]


def _show_key(settings: Settings, key: api_key_pb2.ApiKey) -> None:
    if settings.json:
        out.emit_json(out.as_dict(key))
        return
    click.echo(out.fields(_key_fields(key)))


def _key_fields(key: api_key_pb2.ApiKey) -> list[tuple[str, str]]:
    now = datetime.now(UTC)
    pairs = [
        ("id", key.id),
        ("tenant", key.tenant_id),
        ("name", key.name),
        ("state", out.state(key)),
        ("scopes", ", ".join(key.scopes) or out.NONE),
        ("hint", key.hint),
        ("created", out.when(key.create_time, now)),
        ("last used", out.when(key.last_used_time, now)),
        ("expires", out.when(key.expire_time, now)),
    ]
    if out.is_set(key.revoke_time):
        pairs.append(("revoked", out.when(key.revoke_time, now)))
        pairs.append(("revoke reason", key.revoke_reason or out.NONE))
    if out.is_set(key.leak_time):
        pairs.append(("leaked", out.when(key.leak_time, now)))
        pairs.append(("leak source", key.leak_source or out.NONE))
        pairs.append(("leak url", key.leak_url or out.NONE))
    if key.presented_after_revocation_count:
        pairs.append(
            (
                "TRIPWIRE",
                click.style(
                    f"presented {key.presented_after_revocation_count} times after it stopped "
                    f"working, last {out.when(key.presented_after_revocation_time, now)}",
                    fg="red",
                    bold=True,
                ),
            )
        )
    if key.rotated_from:
        pairs.append(("rotated from", key.rotated_from))
    if key.replaced_by:
        pairs.append(("replaced by", key.replaced_by))
    return pairs


def _show_secret(secret: str) -> None:
    click.echo(SECRET_WARNING, err=True)
    click.echo(secret)


@keys.command("create")
@click.argument("name")
@click.option("--scope", "scope_names", multiple=True, required=True, help="Repeat for each.")
@TENANT
@click.option("--expires-in", type=DURATION, help="Expire after this long (e.g. 90d).")
@pass_settings
def keys_create(
    settings: Settings,
    name: str,
    scope_names: tuple[str, ...],
    tenant: str,
    expires_in: timedelta | None,
) -> None:
    """Create a key; its secret is printed once, alone on stdout.

    \b
    Example:
      apikeys keys create billing-sync --tenant acme --scope passes:read --expires-in 90d
    """
    expire_time = datetime.now(UTC) + expires_in if expires_in else None
    with settings.client() as client:
        response = client.create_key(name, scope_names, tenant_id=tenant, expire_time=expire_time)
    if settings.json:
        out.emit_json(out.as_dict(response))
        return
    key = response.key
    click.echo(f"Created {key.id} ({key.name}) in tenant {key.tenant_id}.", err=True)
    _show_secret(response.secret)


@keys.command("list")
@TENANT
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@click.option("--name-prefix", default="", help="Only keys whose name starts with this.")
@pass_settings
def keys_list(settings: Settings, tenant: str, include_revoked: bool, name_prefix: str) -> None:
    """List keys, newest first.

    \b
    Example:
      apikeys keys list --tenant acme --all
    """
    with settings.client() as client:
        found = list(
            client.list_keys(
                tenant_id=tenant, include_revoked=include_revoked, name_prefix=name_prefix
            )
        )
    if settings.json:
        out.emit_json({"keys": [out.as_dict(key) for key in found]})
        return
    click.echo(out.table(KEY_HEADERS, _key_rows(found)))


@keys.command("get")
@click.argument("key_id")
@TENANT
@pass_settings
def keys_get(settings: Settings, key_id: str, tenant: str) -> None:
    """Show one key.

    \b
    Example:
      apikeys keys get key_01J9ZX --tenant acme
    """
    with settings.client() as client:
        key = client.get_key(key_id, tenant_id=tenant)
    _show_key(settings, key)


@keys.command("update")
@click.argument("key_id")
@TENANT
@click.option("--name", help="The new name.")
@click.option("--scope", "scope_names", multiple=True, help="The new scopes (all of them).")
@pass_settings
def keys_update(
    settings: Settings, key_id: str, tenant: str, name: str | None, scope_names: tuple[str, ...]
) -> None:
    """Rename a key or replace its scopes.

    \b
    Example:
      apikeys keys update key_01J9ZX --tenant acme --scope passes:read --scope passes:write
    """
    if name is None and not scope_names:
        raise click.UsageError("nothing to change: give --name and/or --scope")
    with settings.client() as client:
        key = client.update_key(
            key_id, tenant_id=tenant, name=name, scopes=scope_names if scope_names else None
        )
    _show_key(settings, key)


@keys.command("rotate")
@click.argument("key_id")
@TENANT
@click.option(
    "--overlap",
    type=DURATION,
    required=True,
    help="How long the old key keeps working (e.g. 24h).",
)
@pass_settings
def keys_rotate(settings: Settings, key_id: str, tenant: str, overlap: timedelta) -> None:
    """Make a successor key; the old one keeps working for --overlap.

    The new secret is printed once, alone on stdout; the next steps go to stderr.

    \b
    Example:
      apikeys keys rotate key_01J9ZX --tenant acme --overlap 24h > new-secret
    """
    with settings.client() as client:
        response = client.rotate_key(key_id, overlap, tenant_id=tenant)
    if settings.json:
        out.emit_json(out.as_dict(response))
        return
    new, old = response.key, response.previous
    until = out.when(old.expire_time)
    tenant_flag = f" --tenant {new.tenant_id}" if tenant else ""
    click.echo(f"Rotated {old.id} to {new.id}; {old.id} keeps working until {until}.", err=True)
    click.echo(
        f"Next: deploy the new secret, then `apikeys keys wait-unused {old.id}{tenant_flag} "
        f"--quiet-for 10m`, then `apikeys keys revoke {old.id}{tenant_flag}`.",
        err=True,
    )
    _show_secret(response.secret)


@keys.command("revoke")
@click.argument("key_id")
@TENANT
@click.option("--reason", default="", help="Why (kept in the key and its audit trail).")
@pass_settings
def keys_revoke(settings: Settings, key_id: str, tenant: str, reason: str) -> None:
    """Revoke a key: it stops verifying at once. Revoking twice changes nothing.

    \b
    Example:
      apikeys keys revoke key_01J9ZX --tenant acme --reason "left the company"
    """
    with settings.client() as client:
        key = client.revoke_key(key_id, tenant_id=tenant, reason=reason)
    _show_key(settings, key)


@keys.command("wait-unused")
@click.argument("key_id")
@TENANT
@click.option("--quiet-for", type=DURATION, required=True, help="Silent this long (e.g. 10m).")
@click.option("--timeout", "give_up", type=DURATION, default="24h", show_default=True)
@click.option("--poll", type=DURATION, default="30s", show_default=True, help="Check this often.")
@pass_settings
def keys_wait_unused(
    settings: Settings,
    key_id: str,
    tenant: str,
    quiet_for: timedelta,
    give_up: timedelta,
    poll: timedelta,
) -> None:
    """Wait until a key has not been used for --quiet-for (exit 0), or exit 5 at --timeout.

    Last-used times are written in batches, so they lag by a few seconds.

    \b
    Example:
      apikeys keys wait-unused key_01J9ZX --tenant acme --quiet-for 10m --timeout 24h --poll 30s
    """
    deadline = time.monotonic() + give_up.total_seconds()
    with settings.client() as client:
        while True:
            key = client.get_key(key_id, tenant_id=tenant)
            now = datetime.now(UTC)
            used = key.last_used_time
            last = used.ToDatetime(tzinfo=UTC) if out.is_set(used) else None
            if last is None or now - last >= quiet_for:
                shown = "never used" if last is None else f"last used {out.when(used)}"
                click.echo(f"{key_id}: {shown}; quiet for {quiet_for} or more.", err=True)
                return
            if time.monotonic() >= deadline:
                click.echo(
                    f"{key_id}: still in use (last used {out.when(key.last_used_time)}) "
                    f"after {give_up}.",
                    err=True,
                )
                sys.exit(EXIT_STILL_IN_USE)
            time.sleep(min(poll.total_seconds(), max(0.0, deadline - time.monotonic())))


# -- events -----------------------------------------------------------------------------------


@cli.command()
@TENANT
@click.option("--key", "key_id", default="", help="Only this key's events.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@pass_settings
def events(settings: Settings, tenant: str, key_id: str, limit: int) -> None:
    """The audit trail, newest first.

    \b
    Example:
      apikeys events --tenant acme --key key_01J9ZX
    """
    found = []
    with settings.client() as client:
        for event in client.list_events(tenant_id=tenant, key_id=key_id):
            found.append(event)
            if len(found) >= limit:
                break
    if settings.json:
        out.emit_json({"events": [out.as_dict(event) for event in found]})
        return
    now = datetime.now(UTC)
    rows = [
        [
            out.when(event.time, now),
            api_key_pb2.EventAction.Name(event.action).removeprefix("EVENT_ACTION_"),
            event.key_id,
            event.actor_key_id or out.NONE,
            "; ".join(f"{c.field}: {c.old_value!r} -> {c.new_value!r}" for c in event.changes),
        ]
        for event in found
    ]
    click.echo(out.table(["TIME", "ACTION", "KEY", "BY", "CHANGES"], rows))


# -- verify -----------------------------------------------------------------------------------


def read_stdin_lines() -> list[str]:
    if sys.stdin.isatty():
        click.echo("Reading from stdin; end with Ctrl-D.", err=True)
    return [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]


@cli.command()
@click.option("--scope", "required", multiple=True, help="A scope the call needs; repeat.")
@TENANT
@pass_settings
def verify(settings: Settings, required: tuple[str, ...], tenant: str) -> None:
    """Check a key read from stdin, as a service would; the key is never an argument.

    Exit 0: valid; 3: refused (missing, malformed, unknown, revoked, expired: HTTP 401);
    4: it lacks a required scope (403).

    \b
    Example:
      apikeys verify --scope passes:read < key.txt
    """
    lines = read_stdin_lines()
    if len(lines) != 1:
        raise click.UsageError("give exactly one key on stdin")
    with settings.client() as client:
        answer = client.verify(lines[0], required, tenant_id=tenant)
    code = key_verifier_pb2.VerifyCode.Name(answer.code).removeprefix("VERIFY_CODE_")
    if settings.json:
        out.emit_json(out.as_dict(answer))
    elif answer.valid:
        click.echo(
            f"valid: {answer.key_id} ({answer.name}) tenant {answer.tenant_id}, "
            f"scopes {', '.join(answer.scopes) or out.NONE}"
        )
    else:
        missing = f" (missing {', '.join(answer.missing_scopes)})" if answer.missing_scopes else ""
        click.echo(f"refused: {code}, HTTP {answer.http_status}{missing}")
    if answer.valid:
        return
    sys.exit(
        EXIT_INSUFFICIENT_SCOPE
        if answer.code == key_verifier_pb2.VERIFY_CODE_INSUFFICIENT_SCOPE
        else EXIT_KEY_REFUSED
    )


# -- leaks ------------------------------------------------------------------------------------


@cli.group()
def leaks() -> None:
    """Leaked keys: revoke them and record where they were found."""


@leaks.command("report")
@click.option("--source", default="", help="Who found them (e.g. github-secret-scanning).")
@click.option("--url", default="", help="Where they were found (e.g. the commit's URL).")
@click.option(
    "--scan",
    is_flag=True,
    help="Stdin is any text (a log, a diff): report every key found in it (checksum checked). "
    "Without it, stdin is one key per line.",
)
@pass_settings
def leaks_report(settings: Settings, source: str, url: str, scan: bool) -> None:
    """Revoke leaked keys read from stdin, at once, and record the leak.

    A platform key reaches any tenant's keys; a tenant key its own tenant's only (others show
    NOT_FOUND). Each key is shown by its hint, never whole.

    \b
    Example:
      apikeys leaks report --source gitleaks --url https://github.com/acme/app/commit/0a1b < keys
      git show 0a1b | apikeys leaks report --scan --source review
    """
    secrets = list(find_keys(sys.stdin.read())) if scan else read_stdin_lines()
    if not secrets:
        raise click.UsageError("no keys on stdin" + (" (none found by --scan)" if scan else ""))
    results: list[key_manager_pb2.LeakedKeyResult] = []
    with settings.client() as client:
        for start in range(0, len(secrets), LEAK_BATCH):
            batch = secrets[start : start + LEAK_BATCH]
            results += client.revoke_leaked_keys(batch, source=source, url=url)
    if settings.json:
        out.emit_json({"results": [out.as_dict(result) for result in results]})
        return
    rows = [
        [
            str(number),
            result.hint or out.NONE,
            key_manager_pb2.LeakOutcome.Name(result.outcome).removeprefix("LEAK_OUTCOME_"),
            result.key_id or out.NONE,
        ]
        for number, result in enumerate(results, start=1)
    ]
    click.echo(out.table(["#", "HINT", "OUTCOME", "KEY"], rows))


# -- entry point ------------------------------------------------------------------------------


def fail(error: ApiKeysError) -> NoReturn:
    reason = f" [{error.reason}]" if error.reason else ""
    click.echo(f"apikeys: {error.code.name}{reason}: {error.details}", err=True)
    for field, description in error.field_violations:
        click.echo(f"  {field}: {description}", err=True)
    sys.exit(EXIT_REFUSED)


def main() -> None:
    try:
        cli(prog_name="apikeys")
    except ApiKeysError as error:
        fail(error)
