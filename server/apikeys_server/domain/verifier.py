"""The hot path: shape check, digest, (cached) lookup, rules. Also authenticates callers."""

from collections.abc import Sequence

from apikeys_server.domain import scopes as reserved
from apikeys_server.domain.access import Caller
from apikeys_server.domain.clock import Clock
from apikeys_server.domain.errors import InvalidArgument, Unauthenticated
from apikeys_server.domain.key_format import KeyFormat, digest
from apikeys_server.domain.ports import KeyLookup, TripwireRecorder, UsageRecorder
from apikeys_server.domain.records import KeyState, key_state
from apikeys_server.domain.scopes import ScopeCatalog
from apikeys_server.domain.validation import shown
from apikeys_server.domain.verification import (
    MALFORMED,
    MISSING,
    VerifyCode,
    VerifyResult,
    evaluate,
)

# Codes of a key that exists but stopped working: presenting one trips the tripwire.
_DEAD = frozenset({VerifyCode.REVOKED, VerifyCode.EXPIRED})


class Verifier:
    def __init__(
        self,
        key_format: KeyFormat,
        lookup: KeyLookup,
        catalog: ScopeCatalog,
        clock: Clock,
        usage: UsageRecorder,
        tripwire: TripwireRecorder | None = None,
    ) -> None:
        self._format = key_format
        self._lookup = lookup
        self._catalog = catalog
        self._clock = clock
        self._usage = usage
        self._tripwire = tripwire

    def verify(
        self, caller: Caller, key: str, tenant_id: str, required_scopes: Sequence[str]
    ) -> VerifyResult:
        """Verify as asked by ``caller``: needs apikeys:verify and acts on the caller's tenants."""
        caller.require(reserved.VERIFY)
        tenant = caller.resolve_tenant(tenant_id)
        required = frozenset(required_scopes)
        if not required <= self._catalog.names:
            unknown = sorted(required - self._catalog.names)[0]
            raise InvalidArgument(
                f"required scope {shown(unknown)} is not in the catalog; see ListScopes",
                reason="SCOPE_NOT_IN_CATALOG",
                field=f"required_scopes[{list(required_scopes).index(unknown)}]",
            )
        return self.check(key, tenant, required, presenter=caller.key_id)

    def check(
        self, key: str, tenant_id: str, required: frozenset[str], presenter: str = ""
    ) -> VerifyResult:
        if not key:
            return MISSING
        if not self._format.is_well_formed(key):
            return MALFORMED
        record = self._lookup.find_by_digest(digest(key))
        now = self._clock.now()
        result = evaluate(record, tenant_id, required, now)
        if record is not None:
            if result.valid:
                self._usage.record(record.id, now)
            elif result.code in _DEAD and self._tripwire is not None:
                # The tripwire: the answer is unchanged; the presentation is noted off the path.
                self._tripwire.record_presented(record.id, record.tenant_id, now, presenter)
        return result

    def authenticate(self, key: str | None) -> Caller:
        """The caller of an RPC, from its own key; its scopes are checked by each operation."""
        if not key:
            raise Unauthenticated(
                "missing x-api-key metadata: send a key of this service",
                reason="MISSING_CALLER_KEY",
            )
        if not self._format.is_well_formed(key):
            raise Unauthenticated(
                "x-api-key is not a well-formed key of this deployment",
                reason="MALFORMED_CALLER_KEY",
            )
        record = self._lookup.find_by_digest(digest(key))
        if record is None:
            raise Unauthenticated("x-api-key is not a known key", reason="CALLER_KEY_NOT_KNOWN")
        now = self._clock.now()
        # What evaluate() decides for a key in its own tenant with no scope required.
        state = key_state(record.revoked, record.expire_time, now)
        if state is not KeyState.ACTIVE:
            if self._tripwire is not None:
                self._tripwire.record_presented(record.id, record.tenant_id, now, record.id)
            raise Unauthenticated(
                f"x-api-key {record.id} is {state.value}", reason=f"CALLER_KEY_{state.name}"
            )
        self._usage.record(record.id, now)
        return Caller(record.id, record.tenant_id, record.scopes)
