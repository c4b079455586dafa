"""The scope catalog: built-in and TOML catalogs, reserved scopes, granting rules."""

from pathlib import Path

import pytest

from apikeys_server.domain import scopes
from apikeys_server.domain.errors import InvalidArgument
from apikeys_server.domain.scopes import (
    MAX_SCOPES_PER_KEY,
    RESERVED,
    Scope,
    ScopeCatalog,
    load_catalog,
)

DEFAULT = load_catalog(None)


def write_catalog(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scopes.toml"
    path.write_text(text, encoding="utf-8")
    return path


class TestDefaultCatalog:
    def test_has_the_product_scopes(self) -> None:
        """The built-in catalog grants passes and customers read/write."""
        for name in ("passes:read", "passes:write", "customers:read", "customers:write"):
            assert name in DEFAULT

    def test_has_the_reserved_scopes(self) -> None:
        """The reserved apikeys:manage, apikeys:read and apikeys:verify are always present."""
        assert {scopes.MANAGE, scopes.READ, scopes.VERIFY} <= DEFAULT.names
        assert scopes.MANAGE == "apikeys:manage"
        assert scopes.READ == "apikeys:read"
        assert scopes.VERIFY == "apikeys:verify"

    def test_list_is_sorted_with_descriptions(self) -> None:
        """ListScopes order is by name and every scope has a non-empty description."""
        listed = DEFAULT.list()
        names = [item.name for item in listed]
        assert names == sorted(names)
        assert set(names) == DEFAULT.names
        assert all(isinstance(item, Scope) and item.description for item in listed)

    def test_contains_is_false_for_unknown_and_non_strings(self) -> None:
        """Membership is exact: unknown names, other cases and non-strings are not in it."""
        assert "passes:wirte" not in DEFAULT
        assert "PASSES:READ" not in DEFAULT
        assert None not in DEFAULT


class TestLoadCatalog:
    def test_loads_a_toml_file_and_adds_reserved(self, tmp_path: Path) -> None:
        """A [scopes] table becomes the catalog, with the reserved scopes added."""
        path = write_catalog(tmp_path, '[scopes]\n"orders:read" = "Read orders."\n')
        catalog = load_catalog(path)
        assert catalog.names == {"orders:read", *RESERVED}
        assert Scope("orders:read", "Read orders.") in catalog.list()
        assert "passes:read" not in catalog

    def test_empty_scopes_table_gives_reserved_only(self, tmp_path: Path) -> None:
        """An empty [scopes] table still yields the reserved scopes."""
        catalog = load_catalog(write_catalog(tmp_path, "[scopes]\n"))
        assert catalog.names == set(RESERVED)

    def test_reserved_descriptions_cannot_be_overridden(self, tmp_path: Path) -> None:
        """A file redefining a reserved scope keeps the built-in meaning of it."""
        path = write_catalog(tmp_path, '[scopes]\n"apikeys:manage" = "Anything goes."\n')
        described = {item.name: item.description for item in load_catalog(path).list()}
        assert described[scopes.MANAGE] == RESERVED[scopes.MANAGE]

    def test_scope_without_action_is_allowed(self, tmp_path: Path) -> None:
        """A bare resource name (no ':action') is a valid scope name."""
        catalog = load_catalog(write_catalog(tmp_path, '[scopes]\nreports = "Reports."\n'))
        assert "reports" in catalog

    @pytest.mark.parametrize(
        "text",
        [
            "",
            'title = "no scopes table"\n',
            'scopes = "passes:read"\n',
            "scopes = [1, 2]\n",
            '[scopes]\n"passes:read" = 1\n',
            '[scopes]\n"passes:read" = ["x"]\n',
            '[scopes.passes]\nread = "nested"\n',
        ],
        ids=["empty", "no-table", "string", "array", "number-value", "array-value", "nested"],
    )
    def test_bad_structure_is_a_value_error(self, tmp_path: Path, text: str) -> None:
        """A file without a [scopes] table of name = "description" raises ValueError."""
        with pytest.raises(ValueError, match=r"\[scopes\] table"):
            load_catalog(write_catalog(tmp_path, text))

    def test_invalid_toml_is_a_value_error(self, tmp_path: Path) -> None:
        """A file that is not TOML at all raises ValueError (TOMLDecodeError)."""
        with pytest.raises(ValueError):
            load_catalog(write_catalog(tmp_path, "[scopes\n= nope"))

    @pytest.mark.parametrize(
        "name", ["Passes:read", "passes read", "passes:", ":read", "a:b:c", "x" * 33, "pässe:read"]
    )
    def test_invalid_scope_name_is_a_value_error(self, tmp_path: Path, name: str) -> None:
        """Scope names must look like 'resource:action' in lowercase ASCII."""
        path = write_catalog(tmp_path, f'[scopes]\n"{name}" = "bad"\n')
        with pytest.raises(ValueError, match="resource:action"):
            load_catalog(path)

    def test_missing_file_raises(self, tmp_path: Path) -> None:
        """A catalog path that does not exist fails at start-up, not silently."""
        with pytest.raises(FileNotFoundError):
            load_catalog(tmp_path / "absent.toml")


class TestValidateGrant:
    def test_returns_the_granted_set(self) -> None:
        """Known scopes are granted as a frozenset, duplicates collapsed."""
        granted = DEFAULT.validate_grant(["passes:read", "passes:read", "customers:write"])
        assert granted == frozenset({"passes:read", "customers:write"})

    def test_reserved_scopes_can_be_granted(self) -> None:
        """The reserved apikeys:* scopes are grantable like any other."""
        assert DEFAULT.validate_grant([scopes.VERIFY]) == {scopes.VERIFY}

    def test_empty_is_invalid(self) -> None:
        """A key with no scope at all is refused, pointing to ListScopes."""
        with pytest.raises(InvalidArgument, match="at least one scope"):
            DEFAULT.validate_grant([])

    def test_unknown_scope_is_named(self) -> None:
        """The first unknown scope appears in the message so the caller can fix the typo."""
        with pytest.raises(InvalidArgument, match="'passes:wirte' is not in the catalog"):
            DEFAULT.validate_grant(["passes:read", "passes:wirte"])

    def test_unknown_scopes_are_reported_in_sorted_order(self) -> None:
        """With several unknown scopes the message names the alphabetically first one."""
        with pytest.raises(InvalidArgument, match="'aaa:x'"):
            DEFAULT.validate_grant(["zzz:x", "aaa:x"])

    def test_long_unknown_scope_is_cut_in_message(self) -> None:
        """A huge unknown scope name is not echoed back in full."""
        with pytest.raises(InvalidArgument) as caught:
            DEFAULT.validate_grant(["x" * 10_000])
        assert len(str(caught.value)) < 200

    def test_too_many_scopes(self) -> None:
        """More than MAX_SCOPES_PER_KEY distinct scopes are refused."""
        names = [f"res{i}:read" for i in range(MAX_SCOPES_PER_KEY + 1)]
        catalog = ScopeCatalog(dict.fromkeys(names, "x"))
        with pytest.raises(InvalidArgument, match=f"at most {MAX_SCOPES_PER_KEY}"):
            catalog.validate_grant(names)
        assert len(catalog.validate_grant(names[:MAX_SCOPES_PER_KEY])) == MAX_SCOPES_PER_KEY

    def test_validate_known_accepts_empty(self) -> None:
        """validate_known only checks membership: an empty set is fine."""
        DEFAULT.validate_known([])
        with pytest.raises(InvalidArgument):
            DEFAULT.validate_known(["nope:nope"])
