"""Names, tenant ids, key ids and reasons sent by callers."""

import pytest

from apikeys_server.domain.errors import InvalidArgument
from apikeys_server.domain.validation import (
    MAX_REASON_LENGTH,
    PLATFORM_TENANT,
    shown,
    validate_key_id,
    validate_name,
    validate_reason,
    validate_tenant,
)


class TestName:
    @pytest.mark.parametrize("name", ["crm-sync-prod", "a", "A.b_c-9", "x" * 64])
    def test_valid_names(self, name: str) -> None:
        """Letters, digits, '.', '_' and '-' up to 64 characters are accepted as-is."""
        assert validate_name(name) == name

    @pytest.mark.parametrize(
        "name",
        ["", "x" * 65, "crm sync", "crm/sync", "crmé", "crm\n", " crm", "crm:prod", "🔑"],
        ids=repr,
    )
    def test_invalid_names(self, name: str) -> None:
        """Empty, too long, whitespace, '/', unicode and other punctuation are refused."""
        with pytest.raises(InvalidArgument, match="crm-sync-prod"):
            validate_name(name)

    def test_huge_name_is_cut_in_message(self) -> None:
        """A megabyte name is refused with a short message, not echoed back."""
        with pytest.raises(InvalidArgument) as caught:
            validate_name("n" * 1_000_000)
        assert len(str(caught.value)) < 300
        assert "…" in str(caught.value)


class TestTenant:
    def test_platform_tenant_is_accepted(self) -> None:
        """The reserved platform tenant '_platform' passes although it starts with '_'."""
        assert validate_tenant(PLATFORM_TENANT) == "_platform"

    @pytest.mark.parametrize("tenant", ["acme", "Acme-1", "0tenant", "a.b_c-d", "t" * 64])
    def test_valid_tenants(self, tenant: str) -> None:
        """Tenant ids start with a letter or digit and use the name alphabet."""
        assert validate_tenant(tenant) == tenant

    def test_empty_tenant_is_required(self) -> None:
        """An empty tenant id is refused as required."""
        with pytest.raises(InvalidArgument, match="tenant_id is required"):
            validate_tenant("")

    @pytest.mark.parametrize(
        "tenant",
        ["_acme", "_platform2", "-acme", ".acme", "t" * 65, "ac me", "ac/me", "äcme", "acme\n"],
        ids=repr,
    )
    def test_invalid_tenants(self, tenant: str) -> None:
        """Other leading punctuation, too long, whitespace, '/' and unicode are refused."""
        with pytest.raises(InvalidArgument, match="starting with a letter or digit"):
            validate_tenant(tenant)


class TestKeyId:
    @pytest.mark.parametrize("key_id", ["key_0", "key_0f3kabc", "key_" + "a" * 40])
    def test_valid_key_ids(self, key_id: str) -> None:
        """Key ids are 'key_' and 1-40 lowercase letters or digits."""
        assert validate_key_id(key_id) == key_id

    def test_empty_key_id_is_required(self) -> None:
        """An empty key id is refused as required."""
        with pytest.raises(InvalidArgument, match="key_id is required"):
            validate_key_id("")

    @pytest.mark.parametrize(
        "key_id",
        ["key_", "key", "KEY_abc", "key_ABC", "key_" + "a" * 41, "ak_abc", "key_ab c", "key_é"],
        ids=repr,
    )
    def test_invalid_key_ids(self, key_id: str) -> None:
        """Anything not shaped like a key id is refused, with the value quoted."""
        with pytest.raises(InvalidArgument, match="is not a key id"):
            validate_key_id(key_id)

    def test_secret_passed_as_key_id_is_refused(self) -> None:
        """Pasting a key (the secret) where a key id is expected is refused, not looked up."""
        with pytest.raises(InvalidArgument):
            validate_key_id("ak_" + "A" * 38)


class TestReason:
    def test_reason_up_to_the_limit_is_kept(self) -> None:
        """Reasons are free text (unicode, empty too) of at most MAX_REASON_LENGTH characters."""
        assert validate_reason("") == ""
        assert validate_reason("leaked in a gist — rotated") == "leaked in a gist — rotated"
        assert validate_reason("r" * MAX_REASON_LENGTH) == "r" * MAX_REASON_LENGTH

    def test_too_long_reason_is_refused(self) -> None:
        """One character over the limit is refused, naming the limit."""
        with pytest.raises(InvalidArgument, match=str(MAX_REASON_LENGTH)):
            validate_reason("r" * (MAX_REASON_LENGTH + 1))


class TestShown:
    def test_short_text_is_quoted_whole(self) -> None:
        """Values of up to 64 characters are shown whole, quoted."""
        assert shown("acme") == "'acme'"
        assert shown("x" * 64) == repr("x" * 64)

    def test_long_text_is_cut(self) -> None:
        """Longer values are cut to 64 characters and an ellipsis."""
        assert shown("x" * 65) == repr("x" * 64 + "…")

    def test_control_characters_are_escaped(self) -> None:
        """Newlines and other control characters are escaped, so messages stay one line."""
        assert "\n" not in shown("a\nb")
