"""The Verifier: shape check before lookup, rules, usage recording and caller authentication."""

from datetime import UTC, datetime, timedelta

import pytest

from apikeys_server.domain import scopes
from apikeys_server.domain.access import Caller
from apikeys_server.domain.errors import InvalidArgument, PermissionDenied, Unauthenticated
from apikeys_server.domain.key_format import KeyFormat, digest
from apikeys_server.domain.ports import MISS, Uncached
from apikeys_server.domain.records import KeyRecord, VerifyRecord
from apikeys_server.domain.scopes import load_catalog
from apikeys_server.domain.validation import PLATFORM_TENANT
from apikeys_server.domain.verification import VerifyCode
from apikeys_server.domain.verifier import Verifier
from tests.support import FakeClock

START = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
FORMAT = KeyFormat("ak")


class DictLookup:
    """A fake KeyLookup port over a dict, recording every digest it was asked for."""

    def __init__(self) -> None:
        self.records: dict[bytes, VerifyRecord] = {}
        self.calls: list[bytes] = []

    def add(self, record: VerifyRecord) -> None:
        self.records[record.digest] = record

    def find_by_digest(self, digest: bytes) -> VerifyRecord | None:
        self.calls.append(digest)
        return self.records.get(digest)


class ListUsage:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, datetime]] = []

    def record(self, key_id: str, when: datetime) -> None:
        self.recorded.append((key_id, when))


class Harness:
    def __init__(self) -> None:
        self.lookup = DictLookup()
        self.usage = ListUsage()
        self.clock = FakeClock(START)
        self.verifier = Verifier(FORMAT, self.lookup, load_catalog(None), self.clock, self.usage)
        self._count = 0

    def key(
        self, tenant_id: str = "acme", key_scopes: set[str] | None = None, **changes
    ) -> tuple[str, VerifyRecord]:
        """A fresh key and the record its lookup finds."""
        self._count += 1
        secret = FORMAT.generate()
        record = VerifyRecord.of(
            KeyRecord(
                id=f"key_{self._count}",
                tenant_id=tenant_id,
                name="crm-sync-prod",
                scopes=frozenset(key_scopes if key_scopes is not None else {"passes:read"}),
                hint=FORMAT.hint(secret),
                digest=digest(secret),
                create_time=START - timedelta(days=1),
                **changes,
            )
        )
        self.lookup.add(record)
        return secret, record


@pytest.fixture
def harness() -> Harness:
    return Harness()


VERIFIER_CALLER = Caller("key_verifier", "acme", frozenset({scopes.VERIFY}))
PLATFORM_CALLER = Caller("key_platform", PLATFORM_TENANT, frozenset({scopes.VERIFY}))


class TestCheck:
    def test_missing_key_skips_lookup(self, harness: Harness) -> None:
        """An empty key is MISSING without touching the lookup or recording use."""
        result = harness.verifier.check("", "acme", frozenset())
        assert result.code is VerifyCode.MISSING
        assert harness.lookup.calls == []
        assert harness.usage.recorded == []

    @pytest.mark.parametrize(
        "key",
        ["garbage", "ak_" + "0" * 38, "x" * (1024 * 1024), " ", "ak_é", "wc_live_" + "A" * 38],
        ids=lambda k: repr(k[:20]),
    )
    def test_malformed_key_skips_lookup(self, harness: Harness, key: str) -> None:
        """A malformed key is MALFORMED without touching the lookup."""
        result = harness.verifier.check(key, "acme", frozenset())
        assert result.code is VerifyCode.MALFORMED
        assert harness.lookup.calls == []
        assert harness.usage.recorded == []

    def test_typo_in_real_key_skips_lookup(self, harness: Harness) -> None:
        """A one-character typo in a stored key is caught by the checksum, before any lookup."""
        secret, _ = harness.key()
        last = "0" if secret[-1] != "0" else "1"
        result = harness.verifier.check(secret[:-1] + last, "acme", frozenset())
        assert result.code is VerifyCode.MALFORMED
        assert harness.lookup.calls == []

    def test_valid_key_looks_up_its_digest_and_records_use(self, harness: Harness) -> None:
        """A valid key is looked up by its SHA-256 digest and its use recorded at clock time."""
        secret, record = harness.key()
        result = harness.verifier.check(secret, "acme", frozenset({"passes:read"}))
        assert result.code is VerifyCode.VALID
        assert result.key == record
        assert harness.lookup.calls == [digest(secret)]
        assert harness.usage.recorded == [(record.id, START)]

    def test_unknown_well_formed_key_is_not_found(self, harness: Harness) -> None:
        """A well-formed key that is not stored is NOT_FOUND after one lookup, no use recorded."""
        secret = FORMAT.generate()
        result = harness.verifier.check(secret, "acme", frozenset())
        assert result.code is VerifyCode.NOT_FOUND
        assert harness.lookup.calls == [digest(secret)]
        assert harness.usage.recorded == []

    @pytest.mark.parametrize(
        ("changes", "tenant", "required", "code"),
        [
            ({"revoke_time": START - timedelta(hours=1)}, "acme", set(), VerifyCode.REVOKED),
            ({"expire_time": START}, "acme", set(), VerifyCode.EXPIRED),
            ({}, "acme", {"customers:read"}, VerifyCode.INSUFFICIENT_SCOPE),
            ({}, "globex", set(), VerifyCode.NOT_FOUND),
        ],
        ids=["revoked", "expired", "insufficient-scope", "other-tenant"],
    )
    def test_use_is_recorded_only_when_valid(
        self, harness: Harness, changes, tenant, required, code
    ) -> None:
        """Revoked, expired, under-scoped and other-tenant answers record no use."""
        secret, _ = harness.key(**changes)
        result = harness.verifier.check(secret, tenant, frozenset(required))
        assert result.code is code
        assert harness.usage.recorded == []

    def test_expiry_follows_the_clock(self, harness: Harness) -> None:
        """The clock decides expiry: valid before expire_time, EXPIRED once it is reached."""
        secret, _ = harness.key(expire_time=START + timedelta(minutes=5))
        assert harness.verifier.check(secret, "acme", frozenset()).valid
        harness.clock.advance(timedelta(minutes=5))
        assert harness.verifier.check(secret, "acme", frozenset()).code is VerifyCode.EXPIRED


class TestVerify:
    def test_needs_the_verify_scope(self, harness: Harness) -> None:
        """A caller without apikeys:verify is PERMISSION_DENIED before any lookup."""
        secret, _ = harness.key()
        caller = Caller("key_reader", "acme", frozenset({scopes.READ}))
        with pytest.raises(PermissionDenied, match="apikeys:verify"):
            harness.verifier.verify(caller, secret, "", [])
        assert harness.lookup.calls == []

    def test_tenant_caller_defaults_to_own_tenant(self, harness: Harness) -> None:
        """A tenant caller naming no tenant verifies keys of its own tenant."""
        secret, _ = harness.key()
        assert harness.verifier.verify(VERIFIER_CALLER, secret, "", ["passes:read"]).valid

    def test_tenant_caller_cannot_verify_for_another_tenant(self, harness: Harness) -> None:
        """A tenant caller naming another tenant is PERMISSION_DENIED."""
        secret, _ = harness.key(tenant_id="globex")
        with pytest.raises(PermissionDenied):
            harness.verifier.verify(VERIFIER_CALLER, secret, "globex", [])
        assert harness.lookup.calls == []

    def test_tenant_caller_sees_other_tenants_key_as_not_found(self, harness: Harness) -> None:
        """Verifying another tenant's key for one's own tenant answers NOT_FOUND."""
        secret, _ = harness.key(tenant_id="globex")
        result = harness.verifier.verify(VERIFIER_CALLER, secret, "", [])
        assert result.code is VerifyCode.NOT_FOUND
        assert result.key is None

    def test_platform_caller_names_the_tenant(self, harness: Harness) -> None:
        """A platform caller verifies for the tenant it names and must name one."""
        secret, _ = harness.key(tenant_id="globex")
        assert harness.verifier.verify(PLATFORM_CALLER, secret, "globex", []).valid
        with pytest.raises(InvalidArgument, match="tenant_id is required"):
            harness.verifier.verify(PLATFORM_CALLER, secret, "", [])

    def test_unknown_required_scope_is_invalid_argument(self, harness: Harness) -> None:
        """Requiring a scope outside the catalog is INVALID_ARGUMENT naming it, before lookup."""
        secret, _ = harness.key()
        with pytest.raises(InvalidArgument, match="'passes:wirte' is not in the catalog"):
            harness.verifier.verify(VERIFIER_CALLER, secret, "", ["passes:read", "passes:wirte"])
        assert harness.lookup.calls == []

    def test_long_unknown_required_scope_is_cut_in_message(self, harness: Harness) -> None:
        """A huge unknown required scope is not echoed back in full."""
        with pytest.raises(InvalidArgument) as caught:
            harness.verifier.verify(VERIFIER_CALLER, FORMAT.generate(), "", ["s" * 100_000])
        assert len(str(caught.value)) < 300

    def test_missing_scopes_reported(self, harness: Harness) -> None:
        """Required scopes the key lacks come back sorted with INSUFFICIENT_SCOPE."""
        secret, _ = harness.key()
        result = harness.verifier.verify(
            VERIFIER_CALLER, secret, "", ["passes:write", "passes:read", "customers:read"]
        )
        assert result.code is VerifyCode.INSUFFICIENT_SCOPE
        assert result.missing_scopes == ("customers:read", "passes:write")

    def test_missing_and_malformed_keys_via_verify(self, harness: Harness) -> None:
        """Through verify(), empty and malformed keys still skip the lookup."""
        assert harness.verifier.verify(VERIFIER_CALLER, "", "", []).code is VerifyCode.MISSING
        assert harness.verifier.verify(VERIFIER_CALLER, "nope", "", []).code is VerifyCode.MALFORMED
        assert harness.lookup.calls == []


class TestAuthenticate:
    def test_valid_key_gives_its_caller(self, harness: Harness) -> None:
        """A valid key authenticates as a Caller with its id, tenant and scopes; use recorded."""
        secret, record = harness.key(key_scopes={scopes.MANAGE, scopes.READ})
        caller = harness.verifier.authenticate(secret)
        assert caller == Caller(record.id, "acme", frozenset({scopes.MANAGE, scopes.READ}))
        assert harness.usage.recorded == [(record.id, START)]

    def test_scopes_are_not_checked_here(self, harness: Harness) -> None:
        """A key with only product scopes still authenticates; each operation checks scopes."""
        secret, _ = harness.key(key_scopes={"passes:read"})
        assert harness.verifier.authenticate(secret).scopes == {"passes:read"}

    @pytest.mark.parametrize("key", [None, ""])
    def test_missing_key(self, harness: Harness, key: str | None) -> None:
        """No key at all is UNAUTHENTICATED, asking for x-api-key, without a lookup."""
        with pytest.raises(Unauthenticated, match="missing x-api-key"):
            harness.verifier.authenticate(key)
        assert harness.lookup.calls == []

    def test_malformed_key(self, harness: Harness) -> None:
        """A malformed key is UNAUTHENTICATED without a lookup, and not echoed back."""
        with pytest.raises(Unauthenticated, match="not a well-formed key") as caught:
            harness.verifier.authenticate("ak_secretish_garbage")
        assert "ak_secretish_garbage" not in str(caught.value)
        assert harness.lookup.calls == []

    def test_unknown_key(self, harness: Harness) -> None:
        """A well-formed unknown key is UNAUTHENTICATED and nothing is recorded."""
        secret = FORMAT.generate()
        with pytest.raises(Unauthenticated, match="not a known key") as caught:
            harness.verifier.authenticate(secret)
        assert secret not in str(caught.value)
        assert harness.usage.recorded == []

    def test_revoked_key(self, harness: Harness) -> None:
        """A revoked key is UNAUTHENTICATED naming its id (never its secret)."""
        secret, record = harness.key(revoke_time=START - timedelta(seconds=1))
        with pytest.raises(Unauthenticated, match=f"{record.id} is revoked") as caught:
            harness.verifier.authenticate(secret)
        assert secret not in str(caught.value)
        assert harness.usage.recorded == []

    def test_expired_key(self, harness: Harness) -> None:
        """An expired key is UNAUTHENTICATED, from the instant of its expire_time."""
        secret, record = harness.key(expire_time=START)
        with pytest.raises(Unauthenticated, match=f"{record.id} is expired"):
            harness.verifier.authenticate(secret)
        assert harness.usage.recorded == []

    def test_key_of_another_deployment(self, harness: Harness) -> None:
        """A key of another prefix is UNAUTHENTICATED as malformed, without a lookup."""
        with pytest.raises(Unauthenticated, match="not a well-formed key"):
            harness.verifier.authenticate(KeyFormat("wc_test").generate())
        assert harness.lookup.calls == []


class CachedDictLookup(DictLookup):
    """A lookup with a cache in front (as storage's CachedKeyLookup): ``cached`` answers the
    digests in ``held`` (None: known absent) and MISS for the rest, counted in ``asked``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[bytes, VerifyRecord | None] = {}
        self.asked: list[bytes] = []

    def cached(self, digest: bytes) -> VerifyRecord | Uncached | None:
        self.asked.append(digest)
        return self.held.get(digest, MISS)


class TestDigestFirst:
    """With a cache in front, a key's digest is asked of the cache before its shape check."""

    @pytest.fixture
    def harness(self) -> Harness:
        harness = Harness()
        harness.lookup = CachedDictLookup()
        harness.verifier = Verifier(
            FORMAT, harness.lookup, load_catalog(None), harness.clock, harness.usage
        )
        return harness

    def test_cached_key_skips_the_shape_check(self, harness: Harness, monkeypatch) -> None:
        """A digest the cache holds is answered without the checksum and without a lookup."""
        secret, record = harness.key()
        harness.lookup.held[record.digest] = record

        def refuse(self: KeyFormat, key: str) -> bool:
            raise AssertionError("shape check on a cached key")

        monkeypatch.setattr(KeyFormat, "is_well_formed", refuse)
        result = harness.verifier.check(secret, "acme", frozenset({"passes:read"}))
        assert result.code is VerifyCode.VALID
        assert harness.lookup.calls == []
        assert harness.usage.recorded == [(record.id, START)]

    def test_negative_entry_is_not_found_without_lookup(self, harness: Harness) -> None:
        """A digest the cache knows to be absent is NOT_FOUND without a lookup."""
        secret = FORMAT.generate()
        harness.lookup.held[digest(secret)] = None
        assert harness.verifier.check(secret, "acme", frozenset()).code is VerifyCode.NOT_FOUND
        assert harness.lookup.calls == []

    def test_miss_is_shape_checked_then_looked_up(self, harness: Harness) -> None:
        """On a miss the key is shape-checked, then looked up by the digest already made."""
        secret, _ = harness.key()
        result = harness.verifier.check(secret, "acme", frozenset())
        assert result.code is VerifyCode.VALID
        assert harness.lookup.asked == [digest(secret)]
        assert harness.lookup.calls == [digest(secret)]

    def test_malformed_miss_is_not_looked_up(self, harness: Harness) -> None:
        """A right-length key with a bad checksum misses the cache and is MALFORMED, unlooked-up."""
        secret, _ = harness.key()
        typo = secret[:-1] + ("0" if secret[-1] != "0" else "1")
        assert harness.verifier.check(typo, "acme", frozenset()).code is VerifyCode.MALFORMED
        assert harness.lookup.calls == []

    def test_other_prefix_is_refused_even_if_cached(self, harness: Harness) -> None:
        """A key of another deployment's prefix is MALFORMED before the cache is even asked."""
        other = KeyFormat("wc_test").generate()
        harness.lookup.held[digest(other)] = None
        assert harness.verifier.check(other, "acme", frozenset()).code is VerifyCode.MALFORMED
        assert harness.lookup.asked == []
        assert harness.lookup.calls == []

    def test_verify_as_reads_the_clock_once(self, harness: Harness) -> None:
        """Caller and key are judged at one clock reading, recorded as both keys' last use."""
        caller_secret, caller = harness.key(key_scopes={scopes.VERIFY})
        secret, record = harness.key()
        reads = []
        now = harness.clock.now

        def counted() -> datetime:
            reads.append(1)
            return now()

        harness.clock.now = counted  # type: ignore[method-assign]
        result = harness.verifier.verify_as(caller_secret, secret, "acme", ["passes:read"])
        assert result.code is VerifyCode.VALID
        assert len(reads) == 1
        assert harness.usage.recorded == [(caller.id, START), (record.id, START)]


def _outcome(
    verifier: Verifier,
    caller_secret: str,
    secret: str,
    tenant: str,
    required: list[str],
    *,
    shortcut: bool,
) -> tuple[str, object]:
    """What a verify ended with: its code, key and missing scopes, or the error and reason.
    ``shortcut``: through verify_as; else authenticate, then verify."""
    try:
        if shortcut:
            result = verifier.verify_as(caller_secret, secret, tenant, required)
        else:
            caller = verifier.authenticate(caller_secret)
            result = verifier.verify(caller, secret, tenant, required)
    except (InvalidArgument, PermissionDenied, Unauthenticated) as error:
        return type(error).__name__, error.reason
    return "result", (result.code, result.key.id if result.key else None, result.missing_scopes)


class TestVerifyAsMatchesAuthenticateThenVerify:
    """verify_as decides the common case (a tenant key with apikeys:verify asking in its own
    tenant) without building a Caller; every case must end as authenticate + verify do."""

    @pytest.mark.parametrize("caller_tenant", ["acme", PLATFORM_TENANT])
    @pytest.mark.parametrize("caller_scopes", [{scopes.VERIFY}, {"passes:read"}, set()])
    @pytest.mark.parametrize("asked_tenant", ["acme", "", "globex", PLATFORM_TENANT])
    @pytest.mark.parametrize("key_tenant", ["acme", "globex"])
    @pytest.mark.parametrize(
        "required", [[], ["passes:read"], ["passes:write"], ["no:such-scope"]], ids=repr
    )
    def test_same_outcome_and_same_uses_recorded(
        self,
        caller_tenant: str,
        caller_scopes: set[str],
        asked_tenant: str,
        key_tenant: str,
        required: list[str],
    ) -> None:
        outcomes, uses = [], []
        for shortcut in (True, False):
            harness = Harness()
            caller_secret, _ = harness.key(caller_tenant, caller_scopes)
            secret, _ = harness.key(key_tenant)
            outcomes.append(
                _outcome(
                    harness.verifier,
                    caller_secret,
                    secret,
                    asked_tenant,
                    required,
                    shortcut=shortcut,
                )
            )
            uses.append([key_id for key_id, _ in harness.usage.recorded])
        assert outcomes[0] == outcomes[1]
        assert uses[0] == uses[1]
