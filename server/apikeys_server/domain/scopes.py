"""The scope catalog: which scopes a key may be granted, with a description each."""

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final

from apikeys_server.domain.errors import InvalidArgument

MANAGE: Final = "apikeys:manage"
READ: Final = "apikeys:read"
VERIFY: Final = "apikeys:verify"
RESERVED: Final[Mapping[str, str]] = {
    MANAGE: "Create, edit, rotate and revoke API keys.",
    READ: "List and read API keys, scopes and the audit trail.",
    VERIFY: "Call KeyVerifier.Verify for the keys of a tenant.",
}
SCOPE_PATTERN: Final = re.compile(r"[a-z][a-z0-9_.-]{0,31}(:[a-z][a-z0-9_.-]{0,31})?")
MAX_SCOPES_PER_KEY: Final = 64


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    description: str


class ScopeCatalog:
    def __init__(self, descriptions: Mapping[str, str]) -> None:
        merged = {**descriptions, **RESERVED}
        for name in merged:
            if not SCOPE_PATTERN.fullmatch(name):
                raise ValueError(f"scope name {name!r} is not of the form 'resource:action'")
        self._descriptions = dict(sorted(merged.items()))
        self.names: frozenset[str] = frozenset(merged)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def list(self) -> list[Scope]:
        return [Scope(name, text) for name, text in self._descriptions.items()]

    def validate_grant(self, scopes: Iterable[str], field: str = "scopes") -> frozenset[str]:
        """Scopes for a key: at least one, every one in the catalog."""
        requested = list(scopes)
        granted = frozenset(requested)
        if not granted:
            raise InvalidArgument(
                "at least one scope is required; see ListScopes",
                reason="SCOPES_REQUIRED",
                field=field,
            )
        if len(granted) > MAX_SCOPES_PER_KEY:
            raise InvalidArgument(
                f"a key holds at most {MAX_SCOPES_PER_KEY} scopes",
                reason="TOO_MANY_SCOPES",
                field=field,
            )
        self.validate_known(requested, field)
        return granted

    def validate_known(self, scopes: Iterable[str], field: str = "scopes") -> None:
        """Every scope in the catalog; the error names the first unknown one (sorted) and its
        position in the request (``scopes[1]``)."""
        listed = list(scopes)  # a protobuf repeated field has no index()
        for name in sorted(set(listed)):
            if name not in self.names:
                raise InvalidArgument(
                    f"scope {_quote(name)} is not in the catalog; see ListScopes",
                    reason="SCOPE_NOT_IN_CATALOG",
                    field=f"{field}[{listed.index(name)}]",
                )


def _quote(text: str) -> str:
    shown = text if len(text) <= 64 else text[:64] + "…"
    return repr(shown)


def load_catalog(path: Path | None) -> ScopeCatalog:
    """Loads a TOML catalog (a ``[scopes]`` table of name = description); None: the built-in one."""
    if path is None:
        text = resources.files("apikeys_server").joinpath("default_scopes.toml").read_text()
    else:
        text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    table = data.get("scopes")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError('the scope catalog needs a [scopes] table of name = "description"')
    return ScopeCatalog(table)
