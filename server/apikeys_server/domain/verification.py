"""The Verify rules: given what the lookup found, decide the code and the HTTP status."""

import enum
from dataclasses import dataclass, field
from datetime import datetime

from apikeys_server.domain.records import KeyState, PerRecord, VerifyRecord, key_state


class VerifyCode(enum.Enum):
    VALID = (200, "valid")
    MISSING = (401, "missing")
    MALFORMED = (401, "malformed")
    NOT_FOUND = (401, "not_found")
    REVOKED = (401, "revoked")
    EXPIRED = (401, "expired")
    INSUFFICIENT_SCOPE = (403, "insufficient_scope")

    @property
    def http_status(self) -> int:
        return self.value[0]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    code: VerifyCode
    # The key, when one was found for the tenant (set for every code past NOT_FOUND).
    key: VerifyRecord | None = None
    missing_scopes: tuple[str, ...] = field(default=())

    @property
    def valid(self) -> bool:
        return self.code is VerifyCode.VALID


MISSING = VerifyResult(VerifyCode.MISSING)
MALFORMED = VerifyResult(VerifyCode.MALFORMED)
NOT_FOUND = VerifyResult(VerifyCode.NOT_FOUND)


def evaluate(
    key: VerifyRecord | None, tenant_id: str, required_scopes: frozenset[str], now: datetime
) -> VerifyResult:
    """Tenant first (another tenant's key is NOT_FOUND: existence never leaks), state, scopes."""
    if key is None or key.tenant_id != tenant_id:
        return NOT_FOUND
    # A key neither revoked nor with an expiry time is active at any time: no need to ask.
    if key.revoked or key.expire_time is not None:
        state = key_state(key.revoked, key.expire_time, now)
        if state is KeyState.REVOKED:
            return VerifyResult(VerifyCode.REVOKED, key)
        if state is KeyState.EXPIRED:
            return VerifyResult(VerifyCode.EXPIRED, key)
    if required_scopes <= key.scopes:
        return valid(key)
    missing = tuple(sorted(required_scopes - key.scopes))
    return VerifyResult(VerifyCode.INSUFFICIENT_SCOPE, key, missing)


# The VALID result of a key, one shared per record (~100 bytes each: the record is the cache's).
valid = PerRecord(lambda key: VerifyResult(VerifyCode.VALID, key), limit=4096).of
