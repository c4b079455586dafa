"""The hot path: digest, cache, (shape check and lookup on a miss), rules. Also authenticates
callers.

A cache hit does the least a key needs: SHA-256, one cache read, the rules. The shape check
(alphabet and checksum) runs only when the cache does not know the digest: every digest the
cache holds was stored after a lookup, which only a well-formed key of this deployment gets,
so skipping it changes no answer. Prefix and length are compared before anything else (two
string operations): a key of another deployment's prefix is refused without being hashed.
"""

import enum
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Final

from apikeys_server.domain import scopes as reserved
from apikeys_server.domain.access import Caller
from apikeys_server.domain.clock import Clock
from apikeys_server.domain.errors import InvalidArgument, Unauthenticated
from apikeys_server.domain.key_format import KeyFormat, digest
from apikeys_server.domain.ports import (
    MISS,
    KeyLookup,
    TripwireRecorder,
    Uncached,
    UsageRecorder,
)
from apikeys_server.domain.records import KeyState, PerRecord, VerifyRecord, key_state
from apikeys_server.domain.scopes import ScopeCatalog
from apikeys_server.domain.validation import PLATFORM_TENANT, shown
from apikeys_server.domain.verification import (
    MALFORMED,
    MISSING,
    VerifyCode,
    VerifyResult,
    evaluate,
)

# Codes of a key that exists but stopped working: presenting one trips the tripwire.
_DEAD = frozenset({VerifyCode.REVOKED, VerifyCode.EXPIRED})


class _Shape(enum.Enum):
    MALFORMED = "malformed"


# What _find answers for a key that fails the shape check (it was not looked up).
_MALFORMED: Final = _Shape.MALFORMED
# Callers kept, one per recent caller key.
_CALLERS_MAX = 1024


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
        # The cache alone and the store alone, when the lookup has a cache in front
        # (storage/cache.py): the cache is asked first, the store only for well-formed keys.
        self._cached: Callable[[bytes], VerifyRecord | Uncached | None] | None = getattr(
            lookup, "cached", None
        )
        self._load: Callable[[bytes], VerifyRecord | None] = getattr(
            lookup, "load", lookup.find_by_digest
        )
        self._head = key_format.head
        self._length = key_format.length
        # The Caller of a record, one shared per record (a Caller is immutable).
        self._caller = PerRecord(
            lambda record: Caller(record.id, record.tenant_id, record.scopes), _CALLERS_MAX
        ).of
        self._names = catalog.names

    def verify_as(
        self, caller_key: str | None, key: str, tenant_id: str, required_scopes: Sequence[str]
    ) -> VerifyResult:
        """Verify, for the caller whose own key is ``caller_key``: ``authenticate`` then
        ``verify``, with one clock read for both keys."""
        record, now = self._admit(caller_key)
        # A tenant key that holds apikeys:verify and names its own tenant: what Caller.require
        # and resolve_tenant allow, decided without building a Caller.
        if (
            tenant_id == record.tenant_id
            and reserved.VERIFY in record.scopes
            and tenant_id != PLATFORM_TENANT
        ):
            return self.check(key, tenant_id, self._required(required_scopes), record.id, now)
        return self.verify(self._caller(record), key, tenant_id, required_scopes, now)

    def verify(
        self,
        caller: Caller,
        key: str,
        tenant_id: str,
        required_scopes: Sequence[str],
        now: datetime | None = None,
    ) -> VerifyResult:
        """Verify as asked by ``caller``: needs apikeys:verify and acts on the caller's tenants.
        ``now``: the time to judge the key at (default: the clock's, read after the lookup)."""
        caller.require(reserved.VERIFY)
        tenant = caller.resolve_tenant(tenant_id)
        return self.check(key, tenant, self._required(required_scopes), caller.key_id, now)

    def _required(self, required_scopes: Sequence[str]) -> frozenset[str]:
        """The scopes a Verify asks for, each of which must be in the catalog."""
        required = frozenset(required_scopes)
        if not required <= self._names:
            unknown = sorted(required - self._names)[0]
            raise InvalidArgument(
                f"required scope {shown(unknown)} is not in the catalog; see ListScopes",
                reason="SCOPE_NOT_IN_CATALOG",
                field=f"required_scopes[{list(required_scopes).index(unknown)}]",
            )
        return required

    def check(
        self,
        key: str,
        tenant_id: str,
        required: frozenset[str],
        presenter: str = "",
        now: datetime | None = None,
    ) -> VerifyResult:
        if not key:
            return MISSING
        record = self._find(key)
        if record is _MALFORMED:
            return MALFORMED
        if now is None:
            now = self._clock.now()
        result = evaluate(record, tenant_id, required, now)
        if record is not None:
            if result.code is VerifyCode.VALID:
                self._usage.record(record.id, now)
            elif result.code in _DEAD and self._tripwire is not None:
                # The tripwire: the answer is unchanged; the presentation is noted off the path.
                self._tripwire.record_presented(record.id, record.tenant_id, now, presenter)
        return result

    def authenticate(self, key: str | None) -> Caller:
        """The caller of an RPC, from its own key; its scopes are checked by each operation."""
        return self._caller(self._admit(key)[0])

    def _admit(self, key: str | None) -> tuple[VerifyRecord, datetime]:
        """The record of an active caller key, its use recorded, and the clock's time read for
        it (after its lookup); Unauthenticated for any other key."""
        if not key:
            raise Unauthenticated(
                "missing x-api-key metadata: send a key of this service",
                reason="MISSING_CALLER_KEY",
            )
        record = self._find(key)
        if record is _MALFORMED:
            raise Unauthenticated(
                "x-api-key is not a well-formed key of this deployment",
                reason="MALFORMED_CALLER_KEY",
            )
        if record is None:
            raise Unauthenticated("x-api-key is not a known key", reason="CALLER_KEY_NOT_KNOWN")
        now = self._clock.now()
        # What evaluate() decides for a key in its own tenant with no scope required (a key
        # neither revoked nor with an expiry time is active at any time).
        if record.revoked or record.expire_time is not None:
            state = key_state(record.revoked, record.expire_time, now)
            if state is not KeyState.ACTIVE:
                if self._tripwire is not None:
                    self._tripwire.record_presented(record.id, record.tenant_id, now, record.id)
                raise Unauthenticated(
                    f"x-api-key {record.id} is {state.value}", reason=f"CALLER_KEY_{state.name}"
                )
        self._usage.record(record.id, now)
        return record, now

    def _find(self, key: str) -> VerifyRecord | _Shape | None:
        """The key's record (None: no such key), or _MALFORMED for a key that fails the shape
        check, which is then not looked up. The cache is asked first (see the module's doc)."""
        cached = self._cached
        if cached is not None and len(key) == self._length and key.startswith(self._head):
            key_digest = digest(key)
            found = cached(key_digest)
            if found is not MISS:
                return found
            if not self._format.is_well_formed(key):
                return _MALFORMED
            return self._load(key_digest)
        if not self._format.is_well_formed(key):
            return _MALFORMED
        return self._lookup.find_by_digest(digest(key))
