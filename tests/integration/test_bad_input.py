"""Bad input gets a clear status: one call per case, the exact code, never UNKNOWN or INTERNAL.

A table of hand-picked cases, then a bounded Hypothesis fuzz of every RPC's fields. The cases
do not depend on each other, so one server per database serves the whole module (fast).
"""

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apikeys.v1 import key_manager_pb2, key_verifier_pb2
from apikeys_server.domain.key_format import KeyFormat
from tests.support import RunningServer, running_server, server_settings

TENANT = "acme"
# Just under the 64 KiB request limit (APIKEYS_MAX_REQUEST_BYTES): fields that long are
# refused by validation, not by the transport.
LONG = 60 * 1024
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
OK = grpc.StatusCode.OK
# An existing-looking key of this deployment, never issued: for cases about other fields.
SOME_KEY = KeyFormat("ak").generate()


def _token(payload: object) -> str:
    raw = json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _create(**fields: object) -> key_manager_pb2.CreateKeyRequest:
    values: dict[str, object] = {"tenant_id": TENANT, "name": "svc", "scopes": ["passes:read"]}
    values.update(fields)
    return key_manager_pb2.CreateKeyRequest(**values)  # type: ignore[arg-type]


def _verify(**fields: object) -> key_verifier_pb2.VerifyRequest:
    values: dict[str, object] = {"key": SOME_KEY, "tenant_id": TENANT}
    values.update(fields)
    return key_verifier_pb2.VerifyRequest(**values)  # type: ignore[arg-type]


def _get(key_id: str, tenant_id: str = TENANT) -> key_manager_pb2.GetKeyRequest:
    return key_manager_pb2.GetKeyRequest(tenant_id=tenant_id, key_id=key_id)


def _list(**fields: object) -> key_manager_pb2.ListKeysRequest:
    values: dict[str, object] = {"tenant_id": TENANT}
    values.update(fields)
    return key_manager_pb2.ListKeysRequest(**values)  # type: ignore[arg-type]


def _revoke(**fields: object) -> key_manager_pb2.RevokeKeyRequest:
    values: dict[str, object] = {"tenant_id": TENANT, "key_id": "key_doesnotexist"}
    values.update(fields)
    return key_manager_pb2.RevokeKeyRequest(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    rpc: str
    request: Message
    code: grpc.StatusCode
    # For Verify answers that are OK: the VerifyCode expected.
    verify_code: int | None = None
    # Text the error message must contain (e.g. the unknown scope's name).
    mentions: str | None = None


BAD_NAMES = {
    "empty": "",
    "65-chars": "a" * 65,
    "spaces": "crm sync",
    "unicode": "crm-sync-прод",
    "slash": "crm/sync",
    "nul": "crm\x00sync",
    "newline": "crm-sync\n",
    "60KiB": "a" * LONG,
}
BAD_TENANTS = {
    "leading-underscore": "_acme",
    "leading-dash": "-acme",
    "65-chars": "a" * 65,
    "spaces": "ac me",
    "unicode": "äcme",
    "slash": "acme/other",
    "nul": "acme\x00",
    "60KiB": "a" * LONG,
}
BAD_KEY_IDS = {
    "empty": "",
    "bare-prefix": "key_",
    "upper-case": "key_ABC",
    "no-prefix": "abc123",
    "41-chars": "key_" + "a" * 41,
    "unicode": "key_é",
    "nul": "key_a\x00b",
    "sql": "key_a' OR '1'='1",
    "60KiB": "key_" + "a" * LONG,
}
BAD_TOKENS = {
    "garbage": "!!!!",
    "not-base64-json": "abcd",
    "unicode": "страница",
    "60KiB": "A" * LONG,
    "json-null": _token(None),
    "json-list": _token([1, 2]),
    "missing-fields": _token({"q": "x"}),
    "bad-time": _token({"q": f"keys|{TENANT}|0|", "t": "yesterday", "i": "key_a"}),
    "naive-time": _token({"q": f"keys|{TENANT}|0|", "t": "2024-01-01T00:00:00", "i": "key_a"}),
    "int-id": _token({"q": f"keys|{TENANT}|0|", "t": "2024-01-01T00:00:00+00:00", "i": 5}),
    "other-query": _token({"q": "keys|other|0|", "t": "2024-01-01T00:00:00+00:00", "i": "k"}),
}


def _cases() -> Iterator[object]:
    def case(case_id: str, *args: object, **kwargs: object) -> object:
        return pytest.param(Case(*args, **kwargs), id=case_id)  # type: ignore[arg-type]

    valid = KeyFormat("ak").generate()
    # Verify: a bad presented key is an ordinary OK answer (MISSING/MALFORMED), not an error.
    malformed = key_verifier_pb2.VERIFY_CODE_MALFORMED
    yield case(
        "verify-empty-key", "Verify", _verify(key=""), OK, key_verifier_pb2.VERIFY_CODE_MISSING
    )
    yield case("verify-60KiB-key", "Verify", _verify(key="a" * LONG), OK, malformed)
    yield case(
        "verify-60KiB-prefixed-key", "Verify", _verify(key="ak_" + "A" * LONG), OK, malformed
    )
    yield case("verify-unicode-key", "Verify", _verify(key="ak_ключключключ"), OK, malformed)
    yield case("verify-emoji-key", "Verify", _verify(key=valid[:-1] + "🔑"), OK, malformed)
    yield case(
        "verify-nul-key", "Verify", _verify(key=valid[:10] + "\x00" + valid[10:]), OK, malformed
    )
    yield case("verify-nul-suffix-key", "Verify", _verify(key=valid + "\x00"), OK, malformed)
    yield case("verify-whitespace-key", "Verify", _verify(key="   "), OK, malformed)
    yield case(
        "verify-unknown-required-scope",
        "Verify",
        _verify(required_scopes=["passes:read", "passes:wirte"]),
        INVALID,
        mentions="passes:wirte",
    )
    yield case(
        "verify-60KiB-required-scope", "Verify", _verify(required_scopes=["p" * LONG]), INVALID
    )
    yield case(
        "verify-missing-tenant", "Verify", _verify(tenant_id=""), INVALID, mentions="tenant_id"
    )
    for name, tenant in BAD_TENANTS.items():
        yield case(f"verify-tenant-{name}", "Verify", _verify(tenant_id=tenant), INVALID)

    # CreateKey.
    yield case(
        "create-unknown-scope",
        "CreateKey",
        _create(scopes=["passes:read", "passes:wirte"]),
        INVALID,
        mentions="passes:wirte",
    )
    yield case("create-no-scopes", "CreateKey", _create(scopes=[]), INVALID, mentions="scope")
    yield case("create-empty-scope", "CreateKey", _create(scopes=[""]), INVALID)
    yield case("create-unicode-scope", "CreateKey", _create(scopes=["pässes:read"]), INVALID)
    yield case("create-60KiB-scope", "CreateKey", _create(scopes=["p" * LONG]), INVALID)
    yield case(
        "create-too-many-scopes",
        "CreateKey",
        _create(scopes=[f"s{i}:read" for i in range(65)]),
        INVALID,
    )
    for name, value in BAD_NAMES.items():
        yield case(
            f"create-name-{name}", "CreateKey", _create(name=value), INVALID, mentions="name"
        )
    yield case("create-name-64-chars-is-fine", "CreateKey", _create(name="a" * 64), OK)
    for name, tenant in BAD_TENANTS.items():
        yield case(f"create-tenant-{name}", "CreateKey", _create(tenant_id=tenant), INVALID)
    yield case(
        "create-missing-tenant", "CreateKey", _create(tenant_id=""), INVALID, mentions="tenant_id"
    )
    yield case(
        "create-expire-in-the-past",
        "CreateKey",
        _create(expire_time=Timestamp(seconds=1)),
        INVALID,
        mentions="expire_time",
    )
    yield case(
        "create-expire-out-of-range-low",
        "CreateKey",
        _create(expire_time=Timestamp(seconds=-99999999999)),
        INVALID,
        mentions="expire_time",
    )
    yield case(
        "create-expire-out-of-range-high",
        "CreateKey",
        _create(expire_time=Timestamp(seconds=253402300800)),
        INVALID,
    )
    yield case(
        "create-expire-int64-max",
        "CreateKey",
        _create(expire_time=Timestamp(seconds=2**63 - 1)),
        INVALID,
    )
    yield case(
        "create-expire-negative-nanos",
        "CreateKey",
        _create(expire_time=Timestamp(seconds=4102444800, nanos=-1)),
        INVALID,
    )
    yield case(
        "create-expire-last-representable-instant",
        "CreateKey",
        _create(expire_time=Timestamp(seconds=253402300799, nanos=999999999)),
        OK,
    )

    # GetKey and RevokeKey: key ids and tenants.
    for name, key_id in BAD_KEY_IDS.items():
        yield case(f"get-key-id-{name}", "GetKey", _get(key_id), INVALID)
        yield case(f"revoke-key-id-{name}", "RevokeKey", _revoke(key_id=key_id), INVALID)
    yield case("get-unknown-key", "GetKey", _get("key_doesnotexist"), grpc.StatusCode.NOT_FOUND)
    yield case("get-missing-tenant", "GetKey", _get("key_abc", tenant_id=""), INVALID)
    for name, tenant in BAD_TENANTS.items():
        yield case(f"get-tenant-{name}", "GetKey", _get("key_abc", tenant_id=tenant), INVALID)
    yield case("revoke-unknown-key", "RevokeKey", _revoke(), grpc.StatusCode.NOT_FOUND)
    yield case(
        "revoke-reason-257-chars", "RevokeKey", _revoke(reason="r" * 257), INVALID, mentions="256"
    )
    yield case("revoke-reason-60KiB", "RevokeKey", _revoke(reason="r" * LONG), INVALID)
    yield case(
        "revoke-reason-256-chars-passes-validation",
        "RevokeKey",
        _revoke(reason="r" * 256),
        grpc.StatusCode.NOT_FOUND,
    )
    yield case("revoke-missing-tenant", "RevokeKey", _revoke(tenant_id=""), INVALID)

    # ListKeys: page sizes and tokens.
    yield case("list-page-size-minus-one", "ListKeys", _list(page_size=-1), INVALID)
    yield case("list-page-size-int32-min", "ListKeys", _list(page_size=-(2**31)), INVALID)
    yield case("list-page-size-int32-max", "ListKeys", _list(page_size=2**31 - 1), OK)
    for name, token in BAD_TOKENS.items():
        yield case(
            f"list-token-{name}",
            "ListKeys",
            _list(page_token=token),
            INVALID,
            mentions="page_token",
        )
    yield case("list-missing-tenant", "ListKeys", _list(tenant_id=""), INVALID)
    for name, tenant in BAD_TENANTS.items():
        yield case(f"list-tenant-{name}", "ListKeys", _list(tenant_id=tenant), INVALID)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """One real server per database for the whole module (overrides the per-test fixture)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('bad_input') / 'apikeys.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    with running_server(server_settings(url)) as running:
        yield running


def _invoke(
    server: RunningServer, channel: grpc.Channel, rpc: str, request: Message
) -> tuple[grpc.StatusCode, str, Message | None]:
    manager, verifier = server.stubs(channel)
    stub = verifier if rpc == "Verify" else manager
    try:
        response = getattr(stub, rpc)(
            request, metadata=(("x-api-key", server.admin_key),), timeout=30
        )
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None
    return OK, "", response


class TestBadInputTable:
    @pytest.mark.parametrize("case", list(_cases()))
    def test_gets_the_exact_status(self, server: RunningServer, case: Case) -> None:
        """Each bad input answers its documented status, with a short message, never INTERNAL."""
        with server.channel() as channel:
            code, details, response = _invoke(server, channel, case.rpc, case.request)
        assert code not in NEVER, details
        assert code == case.code, details
        if case.mentions is not None:
            assert case.mentions in details
        # Messages quote what was sent, cut short: a 1 MiB input is never echoed back.
        assert len(details) < 1000
        if case.verify_code is not None:
            assert isinstance(response, key_verifier_pb2.VerifyResponse)
            assert response.code == case.verify_code
            assert not response.valid
            assert response.http_status == 401


class TestRequestSizeLimit:
    @pytest.mark.parametrize("rpc", ["Verify", "CreateKey"])
    def test_a_request_over_the_limit_is_refused_with_the_sizes(
        self, server: RunningServer, rpc: str
    ) -> None:
        """A 1 MiB request answers RESOURCE_EXHAUSTED naming its size and the limit."""
        request = _verify(key="a" * (1 << 20)) if rpc == "Verify" else _create(name="n" * (1 << 20))
        with server.channel() as channel:
            code, details, _ = _invoke(server, channel, rpc, request)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "65536" in details, details


# -- fuzz ----------------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
texts = st.text(max_size=80)
tenants = st.one_of(texts, st.sampled_from([TENANT, "globex", "_platform", ""]))
names = st.one_of(texts, st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True))
scope_lists = st.lists(
    st.one_of(
        texts, st.sampled_from(["passes:read", "passes:write", "apikeys:manage", "customers:read"])
    ),
    max_size=5,
)
key_ids = st.one_of(texts, st.from_regex(r"key_[a-z0-9]{1,40}", fullmatch=True))
keys = st.one_of(
    texts,
    st.builds(lambda: KeyFormat("ak").generate()),
    st.from_regex(r"ak_[0-9A-Za-z]{38}", fullmatch=True),
)
int32 = st.integers(-(2**31), 2**31 - 1)
tokens = st.one_of(
    texts,
    st.binary(max_size=120).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.fixed_dictionaries({"q": texts, "t": texts, "i": texts}).map(_token),
)
timestamps = st.one_of(
    st.none(),
    st.builds(
        Timestamp,
        seconds=st.integers(-(2**63), 2**63 - 1),
        nanos=int32,
    ),
    st.builds(
        Timestamp,
        seconds=st.integers(-62135596800, 253402300799),
        nanos=st.integers(0, 999_999_999),
    ),
)
durations = st.builds(Duration, seconds=st.integers(-(2**63), 2**63 - 1), nanos=int32) | st.builds(
    Duration, seconds=st.integers(-(10**7), 10**7), nanos=st.integers(0, 999_999_999)
)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with server.channel() as opened:
        yield opened


def _assert_handled(
    server: RunningServer, channel: grpc.Channel, rpc: str, request: Message
) -> None:
    code, details, _ = _invoke(server, channel, rpc, request)
    assert code not in NEVER, f"{rpc} answered {code.name}: {details}"


class TestFuzz:
    @FUZZ
    @given(tenant=tenants, name=names, scopes=scope_lists, expire=timestamps)
    def test_create_key(self, server, channel, tenant, name, scopes, expire) -> None:
        """CreateKey with random fields never answers UNKNOWN or INTERNAL."""
        request = key_manager_pb2.CreateKeyRequest(tenant_id=tenant, name=name, scopes=scopes)
        if expire is not None:
            request.expire_time.CopyFrom(expire)
        _assert_handled(server, channel, "CreateKey", request)

    @FUZZ
    @given(tenant=tenants, key_id=key_ids)
    def test_get_key(self, server, channel, tenant, key_id) -> None:
        """GetKey with random fields never answers UNKNOWN or INTERNAL."""
        request = key_manager_pb2.GetKeyRequest(tenant_id=tenant, key_id=key_id)
        _assert_handled(server, channel, "GetKey", request)

    @FUZZ
    @given(tenant=tenants, size=int32, token=tokens, include_revoked=st.booleans(), prefix=texts)
    def test_list_keys(self, server, channel, tenant, size, token, include_revoked, prefix) -> None:
        """ListKeys with random fields never answers UNKNOWN or INTERNAL."""
        request = key_manager_pb2.ListKeysRequest(
            tenant_id=tenant,
            page_size=size,
            page_token=token,
            include_revoked=include_revoked,
            name_prefix=prefix,
        )
        _assert_handled(server, channel, "ListKeys", request)

    @FUZZ
    @given(
        tenant=tenants,
        key_id=key_ids,
        name=names,
        scopes=scope_lists,
        paths=st.lists(st.one_of(texts, st.sampled_from(["name", "scopes"])), max_size=3),
    )
    def test_update_key(self, server, channel, tenant, key_id, name, scopes, paths) -> None:
        """UpdateKey with random fields never answers UNKNOWN or INTERNAL."""
        request = key_manager_pb2.UpdateKeyRequest(
            tenant_id=tenant,
            key_id=key_id,
            name=name,
            scopes=scopes,
            update_mask=FieldMask(paths=paths),
        )
        _assert_handled(server, channel, "UpdateKey", request)

    @FUZZ
    @given(tenant=tenants, key_id=key_ids, overlap=durations)
    def test_rotate_key(self, server, channel, tenant, key_id, overlap) -> None:
        """RotateKey with random fields never answers UNKNOWN or INTERNAL."""
        request = key_manager_pb2.RotateKeyRequest(tenant_id=tenant, key_id=key_id, overlap=overlap)
        _assert_handled(server, channel, "RotateKey", request)

    @FUZZ
    @given(
        tenant=tenants, key_id=key_ids, reason=st.one_of(texts, st.text(min_size=250, max_size=300))
    )
    def test_revoke_key(self, server, channel, tenant, key_id, reason) -> None:
        """RevokeKey with random fields never answers UNKNOWN or INTERNAL."""
        request = key_manager_pb2.RevokeKeyRequest(tenant_id=tenant, key_id=key_id, reason=reason)
        _assert_handled(server, channel, "RevokeKey", request)

    @FUZZ
    @given(tenant=tenants, key_id=st.one_of(st.just(""), key_ids), size=int32, token=tokens)
    def test_list_events(self, server, channel, tenant, key_id, size, token) -> None:
        """ListEvents with random fields never answers UNKNOWN or INTERNAL."""
        request = key_manager_pb2.ListEventsRequest(
            tenant_id=tenant, key_id=key_id, page_size=size, page_token=token
        )
        _assert_handled(server, channel, "ListEvents", request)

    @FUZZ
    @given(key=keys, tenant=tenants, required=scope_lists)
    def test_verify(self, server, channel, key, tenant, required) -> None:
        """Verify with random fields never answers UNKNOWN or INTERNAL."""
        request = key_verifier_pb2.VerifyRequest(
            key=key, tenant_id=tenant, required_scopes=required
        )
        _assert_handled(server, channel, "Verify", request)

    @FUZZ
    @given(caller=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=100))
    def test_caller_key_metadata(self, server, channel, caller) -> None:
        """Any printable x-api-key value that is not a real key answers UNAUTHENTICATED."""
        _, verifier = server.stubs(channel)
        try:
            verifier.Verify(
                key_verifier_pb2.VerifyRequest(key=SOME_KEY, tenant_id=TENANT),
                metadata=(("x-api-key", caller),),
                timeout=10,
            )
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
        else:
            raise AssertionError(f"x-api-key {caller!r} was accepted")
