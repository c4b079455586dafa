"""What the load generator sends and what each answer must be, byte for byte."""

from collections.abc import Callable
from dataclasses import dataclass

from apikeys.v1 import key_verifier_pb2
from bench.echo import ECHO_RESPONSE
from bench.fixtures import GRANTED, KEY_FORMAT, REQUIRED, TENANT, BenchKey, unknown_keys

VERIFY_PATH = "/apikeys.v1.KeyVerifier/Verify"

# (serialized VerifyRequest, serialized expected VerifyResponse)
Call = tuple[bytes, bytes]


@dataclass(frozen=True)
class Workload:
    """Calls to cycle through; ``make(n)`` gives n of them (fresh ones where that matters)."""

    caller: str
    make: Callable[[int], list[Call]]
    distinct: str  # how the keys vary, for the report


def request(key: str) -> bytes:
    return key_verifier_pb2.VerifyRequest(
        key=key, tenant_id=TENANT, required_scopes=list(REQUIRED)
    ).SerializeToString()


def _valid_answer(key: BenchKey, position: int) -> bytes:
    return _key_answer(key, position, key_verifier_pb2.VERIFY_CODE_VALID, 200)


def _key_answer(
    key: BenchKey, position: int, code: "key_verifier_pb2.VerifyCode.ValueType", status: int
) -> bytes:
    """An answer naming the key. Built from the fixture's own data, not by the server's
    converter under test."""
    return key_verifier_pb2.VerifyResponse(
        valid=code == key_verifier_pb2.VERIFY_CODE_VALID,
        code=code,
        http_status=status,
        key_id=key.record.id,
        tenant_id=TENANT,
        name=key.record.name,
        scopes=sorted(GRANTED),
        feed_position=position,
    ).SerializeToString()


def _refused(code: "key_verifier_pb2.VerifyCode.ValueType", position: int = 0) -> bytes:
    return key_verifier_pb2.VerifyResponse(
        valid=False, code=code, http_status=401, feed_position=position
    ).SerializeToString()


def _cycle(calls: list[Call]) -> Callable[[int], list[Call]]:
    return lambda _count: calls


def valid(caller: str, keys: list[BenchKey], position: int) -> Workload:
    """``position``: the change-feed position the server's answers reflect."""
    calls = [(request(key.secret), _valid_answer(key, position)) for key in keys]
    return Workload(caller, _cycle(calls), f"{len(keys)} valid keys, round robin")


def echo(caller: str, keys: list[BenchKey]) -> Workload:
    answer = ECHO_RESPONSE.SerializeToString()
    calls = [(request(key.secret), answer) for key in keys]
    return Workload(caller, _cycle(calls), f"same requests as the cache hit ({len(keys)} keys)")


def malformed(caller: str, count: int) -> Workload:
    """Right prefix and length, wrong checksum: refused by the shape check alone."""
    keys = []
    for key in unknown_keys(count):
        last = "0" if key[-1] != "0" else "1"
        keys.append(key[:-1] + last)
    assert not any(KEY_FORMAT.is_well_formed(key) for key in keys)
    answer = _refused(key_verifier_pb2.VERIFY_CODE_MALFORMED)
    return Workload(caller, _cycle([(request(key), answer) for key in keys]), f"{count} keys")


def unknown(caller: str, count: int, position: int) -> Workload:
    """The same well-formed unknown keys again and again: the negative cache answers."""
    answer = _refused(key_verifier_pb2.VERIFY_CODE_NOT_FOUND, position)
    calls = [(request(key), answer) for key in unknown_keys(count)]
    return Workload(caller, _cycle(calls), f"{count} unknown keys, round robin")


def unknown_fresh(caller: str, position: int) -> Workload:
    """A brute-force flood: a new well-formed key every call, so no cache can answer."""
    answer = _refused(key_verifier_pb2.VERIFY_CODE_NOT_FOUND, position)

    def make(count: int) -> list[Call]:
        return [(request(key), answer) for key in unknown_keys(count)]

    return Workload(caller, make, "a new unknown key every call")


def revoked(caller: str, key: BenchKey, position: int) -> Workload:
    """One revoked key, every call: the tripwire's flood (REVOKED, the key named)."""
    answer = _key_answer(key, position, key_verifier_pb2.VERIFY_CODE_REVOKED, 401)
    return Workload(caller, _cycle([(request(key.secret), answer)]), "1 revoked key, every call")
