"""The caller of an RPC: its scopes and the tenants it may act on."""

import pytest

from apikeys_server.domain import scopes
from apikeys_server.domain.access import Caller
from apikeys_server.domain.errors import InvalidArgument, PermissionDenied
from apikeys_server.domain.validation import PLATFORM_TENANT

PLATFORM = Caller("key_admin", PLATFORM_TENANT, frozenset({scopes.MANAGE, scopes.READ}))
TENANT = Caller("key_acme", "acme", frozenset({scopes.READ}))


class TestRequire:
    def test_held_scope_passes(self) -> None:
        """A caller holding the scope passes the check."""
        TENANT.require(scopes.READ)
        PLATFORM.require(scopes.MANAGE)

    def test_missing_scope_is_permission_denied(self) -> None:
        """A caller lacking the scope gets PERMISSION_DENIED naming its key and the scope."""
        with pytest.raises(PermissionDenied, match=r"key_acme.*'apikeys:manage'"):
            TENANT.require(scopes.MANAGE)

    def test_platform_key_needs_scopes_too(self) -> None:
        """Being a platform key grants no scope by itself."""
        with pytest.raises(PermissionDenied):
            PLATFORM.require(scopes.VERIFY)


class TestIsPlatform:
    def test_platform_flag(self) -> None:
        """Only a key of the '_platform' tenant is a platform caller."""
        assert PLATFORM.is_platform
        assert not TENANT.is_platform


class TestResolveTenantPlatform:
    def test_names_the_tenant(self) -> None:
        """A platform caller acts on the tenant it names."""
        assert PLATFORM.resolve_tenant("acme") == "acme"
        assert PLATFORM.resolve_tenant("globex") == "globex"

    def test_may_name_the_platform_tenant(self) -> None:
        """A platform caller may act on the platform tenant itself."""
        assert PLATFORM.resolve_tenant(PLATFORM_TENANT) == PLATFORM_TENANT

    def test_empty_is_invalid(self) -> None:
        """A platform caller must name a tenant: empty is INVALID_ARGUMENT."""
        with pytest.raises(InvalidArgument, match="tenant_id is required"):
            PLATFORM.resolve_tenant("")

    @pytest.mark.parametrize("requested", ["_acme", "ac me", "a" * 65, "acme/x"])
    def test_invalid_syntax_is_invalid(self, requested: str) -> None:
        """A platform caller naming a malformed tenant gets INVALID_ARGUMENT."""
        with pytest.raises(InvalidArgument):
            PLATFORM.resolve_tenant(requested)


class TestResolveTenantTenant:
    def test_empty_means_own_tenant(self) -> None:
        """A tenant caller that names no tenant acts on its own."""
        assert TENANT.resolve_tenant("") == "acme"

    def test_own_tenant_named(self) -> None:
        """A tenant caller naming its own tenant acts on it."""
        assert TENANT.resolve_tenant("acme") == "acme"

    def test_other_tenant_is_permission_denied(self) -> None:
        """A tenant caller naming another tenant gets PERMISSION_DENIED naming both."""
        with pytest.raises(PermissionDenied, match=r"'acme' only, not on 'globex'"):
            TENANT.resolve_tenant("globex")

    def test_platform_tenant_is_permission_denied(self) -> None:
        """A tenant caller cannot act on the platform tenant."""
        with pytest.raises(PermissionDenied):
            TENANT.resolve_tenant(PLATFORM_TENANT)

    @pytest.mark.parametrize("requested", ["_acme", "ac me", "a" * 65, "acme/x", "ácme"])
    def test_invalid_syntax_is_invalid_argument(self, requested: str) -> None:
        """A malformed tenant is INVALID_ARGUMENT, not PERMISSION_DENIED."""
        with pytest.raises(InvalidArgument):
            TENANT.resolve_tenant(requested)

    def test_huge_tenant_is_cut_in_message(self) -> None:
        """A huge tenant id is not echoed back in full."""
        with pytest.raises(InvalidArgument) as caught:
            TENANT.resolve_tenant("a" * 1_000_000)
        assert len(str(caught.value)) < 300
