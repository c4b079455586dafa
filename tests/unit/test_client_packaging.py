"""The client installs and imports without the server's dependencies (apikeys[server])."""

import importlib.metadata
import json
import pkgutil
import re
import subprocess
import sys

import apikeys_client

SERVER_ONLY = {
    "sqlalchemy",
    "alembic",
    "psycopg",
    "cachetools",
    "grpcio-health-checking",
    "grpcio-reflection",
    "xds-protos",
    # The admin console (apikeys-server console).
    "starlette",
    "jinja2",
    "uvicorn",
    "python-multipart",
}
CLIENT = {"grpcio", "protobuf", "grpcio-status", "googleapis-common-protos", "click"}


def _requirements() -> dict[str, list[str]]:
    """Each requirement of the installed apikeys, by distribution name: its markers."""
    found: dict[str, list[str]] = {}
    for line in importlib.metadata.requires("apikeys") or []:
        name = re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower()
        marker = line.split(";", 1)[1].strip() if ";" in line else ""
        found.setdefault(name, []).append(marker)
    return found


def test_server_dependencies_are_behind_the_server_extra() -> None:
    requirements = _requirements()
    for name in SERVER_ONLY:
        assert requirements.get(name), f"{name} is not declared"
        assert all('extra == "server"' in marker for marker in requirements[name]), name
    for name in CLIENT:
        assert "" in requirements[name], f"{name} must be a base dependency"
    base = {name for name, markers in requirements.items() if "" in markers}
    assert base == CLIENT


def test_importing_the_client_imports_no_server_dependency() -> None:
    """A fresh interpreter imports every apikeys_client module (middleware included, if any)
    without loading sqlalchemy, psycopg, alembic or the server package."""
    modules = ["apikeys_client"] + [
        f"apikeys_client.{info.name}" for info in pkgutil.iter_modules(apikeys_client.__path__)
    ]
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(result.stdout))
    roots = {name.split(".")[0] for name in loaded}
    for forbidden in ("sqlalchemy", "psycopg", "alembic", "cachetools", "apikeys_server"):
        assert forbidden not in roots, forbidden
