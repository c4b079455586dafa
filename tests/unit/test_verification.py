"""The Verify rules: tenant, state and scopes decide the code and the HTTP status."""

from datetime import UTC, datetime, timedelta

import pytest

from apikeys_server.domain.records import KeyRecord, VerifyRecord
from apikeys_server.domain.verification import (
    MALFORMED,
    MISSING,
    NOT_FOUND,
    VerifyCode,
    VerifyResult,
    evaluate,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TENANT = "acme"


def record(**changes: object) -> VerifyRecord:
    fields: dict[str, object] = {
        "id": "key_abc",
        "tenant_id": TENANT,
        "name": "crm-sync-prod",
        "scopes": frozenset({"passes:read", "passes:write"}),
        "hint": "ak_abcd…",
        "digest": b"\x00" * 32,
        "create_time": NOW - timedelta(days=1),
    }
    fields.update(changes)
    return VerifyRecord.of(KeyRecord(**fields))  # type: ignore[arg-type]


class TestEvaluate:
    def test_valid(self) -> None:
        """An active key of the tenant holding every required scope is VALID with its record."""
        key = record()
        result = evaluate(key, TENANT, frozenset({"passes:read"}), NOW)
        assert result == VerifyResult(VerifyCode.VALID, key)
        assert result.valid
        assert result.missing_scopes == ()

    def test_valid_with_no_required_scopes(self) -> None:
        """Requiring nothing only checks the tenant and the state."""
        assert evaluate(record(), TENANT, frozenset(), NOW).code is VerifyCode.VALID

    def test_unknown_key_is_not_found(self) -> None:
        """No record: NOT_FOUND, carrying no key."""
        result = evaluate(None, TENANT, frozenset(), NOW)
        assert result is NOT_FOUND
        assert result.key is None
        assert not result.valid

    def test_another_tenants_key_is_not_found(self) -> None:
        """A key of another tenant is NOT_FOUND, exactly like an unknown key: nothing leaks."""
        result = evaluate(record(tenant_id="globex"), TENANT, frozenset({"passes:read"}), NOW)
        assert result is NOT_FOUND
        assert result.key is None

    def test_another_tenants_revoked_key_is_not_found(self) -> None:
        """Another tenant's revoked key is NOT_FOUND too, not REVOKED."""
        key = record(tenant_id="globex", revoke_time=NOW - timedelta(hours=1))
        assert evaluate(key, TENANT, frozenset(), NOW) is NOT_FOUND

    def test_revoked(self) -> None:
        """A revoked key is REVOKED, whatever the scopes asked for."""
        key = record(revoke_time=NOW - timedelta(seconds=1))
        result = evaluate(key, TENANT, frozenset({"customers:read"}), NOW)
        assert result == VerifyResult(VerifyCode.REVOKED, key)

    def test_revoked_beats_expired(self) -> None:
        """A key both revoked and expired reports REVOKED."""
        key = record(revoke_time=NOW - timedelta(days=1), expire_time=NOW - timedelta(days=2))
        assert evaluate(key, TENANT, frozenset(), NOW).code is VerifyCode.REVOKED

    def test_expired(self) -> None:
        """A key past its expire_time is EXPIRED, carrying the record."""
        key = record(expire_time=NOW - timedelta(hours=1))
        assert evaluate(key, TENANT, frozenset(), NOW) == VerifyResult(VerifyCode.EXPIRED, key)

    def test_expiry_exactly_now_is_expired(self) -> None:
        """expire_time equal to now is already EXPIRED."""
        key = record(expire_time=NOW)
        assert evaluate(key, TENANT, frozenset(), NOW).code is VerifyCode.EXPIRED

    def test_one_microsecond_before_expiry_is_valid(self) -> None:
        """One microsecond before expire_time the key is still VALID."""
        key = record(expire_time=NOW)
        result = evaluate(key, TENANT, frozenset(), NOW - timedelta(microseconds=1))
        assert result.code is VerifyCode.VALID

    def test_expired_beats_insufficient_scope(self) -> None:
        """State is checked before scopes: an expired key lacking scopes is EXPIRED."""
        key = record(expire_time=NOW - timedelta(seconds=1))
        result = evaluate(key, TENANT, frozenset({"customers:read"}), NOW)
        assert result.code is VerifyCode.EXPIRED
        assert result.missing_scopes == ()

    def test_insufficient_scope_lists_missing_sorted(self) -> None:
        """Missing scopes come back sorted, without the scopes the key holds."""
        key = record()
        required = frozenset({"passes:read", "customers:write", "customers:read"})
        result = evaluate(key, TENANT, required, NOW)
        assert result.code is VerifyCode.INSUFFICIENT_SCOPE
        assert result.key is key
        assert result.missing_scopes == ("customers:read", "customers:write")
        assert not result.valid


class TestVerifyCode:
    @pytest.mark.parametrize(
        ("code", "status"),
        [
            (VerifyCode.VALID, 200),
            (VerifyCode.MISSING, 401),
            (VerifyCode.MALFORMED, 401),
            (VerifyCode.NOT_FOUND, 401),
            (VerifyCode.REVOKED, 401),
            (VerifyCode.EXPIRED, 401),
            (VerifyCode.INSUFFICIENT_SCOPE, 403),
        ],
    )
    def test_http_status(self, code: VerifyCode, status: int) -> None:
        """200 for VALID, 403 for INSUFFICIENT_SCOPE, 401 for every other code."""
        assert code.http_status == status

    def test_keyless_constants(self) -> None:
        """The shared MISSING/MALFORMED/NOT_FOUND results carry no key and are not valid."""
        for result, code in (
            (MISSING, "MISSING"),
            (MALFORMED, "MALFORMED"),
            (NOT_FOUND, "NOT_FOUND"),
        ):
            assert result.code is VerifyCode[code]
            assert result.key is None
            assert not result.valid
