"""Logs and metrics of the real ``apikeys-server serve`` process, seen from outside."""

import base64
import json
import os
import signal
import urllib.request
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from apikeys.v1 import key_verifier_pb2
from apikeys_client import ApiKeysClient, ApiKeysError
from apikeys_server.domain.key_format import digest
from apikeys_server.logs import RefusedCallers
from tests.e2e.conftest import ServerFactory, free_port
from tests.e2e.test_processes import children, wait_for

pytestmark = pytest.mark.e2e
UNKNOWN_CALLER = "ak_" + "A" * 38  # malformed too: the cheapest refusal


def test_json_log_session_has_no_secret(server_factory: ServerFactory) -> None:
    """A whole session with --log-format json: every line is a JSON object, the management
    actions and refused callers are there, and no secret, random part or digest is."""
    server = server_factory(args=("--log-format", "json"))
    with server.client() as admin:
        created = admin.create_key("crm", ["passes:read"], tenant_id="acme")
        admin.update_key(created.key.id, tenant_id="acme", name="crm-2")
        rotated = admin.rotate_key(created.key.id, timedelta(0), tenant_id="acme")
        for secret in (created.secret, rotated.secret):
            admin.verify(secret, ["passes:read"], tenant_id="acme")
        admin.verify(created.secret + "x", [], tenant_id="acme")
        admin.revoke_key(rotated.key.id, tenant_id="acme")
    floods = 50
    for attempt in range(floods):
        caller = created.secret if attempt % 2 else UNKNOWN_CALLER  # revoked/rotated, unknown
        stranger = ApiKeysClient(server.target, caller, timeout=10)
        with stranger, pytest.raises(ApiKeysError):
            stranger.list_scopes()
    assert server.terminate() == 0

    lines = server.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line, or this fails
    assert all(isinstance(entry, dict) and "message" in entry for entry in entries)
    events = [entry.get("event") for entry in entries]
    assert events.count("key_created") == 1
    assert events.count("key_updated") == 1
    assert events.count("key_rotated") == 1
    assert events.count("key_revoked") == 1
    created_line = next(entry for entry in entries if entry.get("event") == "key_created")
    assert created_line["key_id"] == created.key.id
    assert created_line["tenant_id"] == "acme"
    assert created_line["caller_key_id"]
    # Rate-limited: at most a burst one by one per interval, the rest counted in a summary
    # (at the next refusal after the interval, or at shutdown); every refusal is accounted for.
    one_by_one = events.count("caller_refused")
    summaries = [entry for entry in entries if entry.get("event") == "callers_refused_summary"]
    assert summaries
    assert one_by_one <= RefusedCallers().burst * (len(summaries) + 1) < floods
    summarised = sum(entry["refused"] - entry["logged"] for entry in summaries)
    assert one_by_one + summarised == floods

    text = "\n".join(lines)
    for secret in [*server.secrets, created.secret, rotated.secret]:
        body = secret.rsplit("_", 1)[-1]
        hashed = digest(secret)
        for shown in (secret, body, hashed.hex(), base64.b64encode(hashed).decode()):
            assert shown not in text, f"a secret ({secret[:6]}…) or its digest is in the log"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        families = text_string_to_metric_families(answer.read().decode())
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
    }


def verified_ok(samples: Samples) -> float:
    labels = {
        "grpc_type": "unary",
        "grpc_service": "apikeys.v1.KeyVerifier",
        "grpc_method": "Verify",
        "grpc_code": "OK",
    }
    return samples.get(("grpc_server_handled_total", frozenset(labels.items())), 0.0)


def counted(samples: Samples, calls: int) -> Samples | None:
    return samples if verified_ok(samples) >= calls else None


def test_metrics_of_several_processes(server_factory: ServerFactory) -> None:
    """--processes 2: the parent serves every worker's counters, and keeps a dead worker's."""
    port = free_port()
    server = server_factory(
        args=("--processes", "2", "--metrics-listen", f"127.0.0.1:{port}"),
        env={"APIKEYS_FEED_POLL_SECONDS": "0.05"},
    )
    calls = 40
    with server.client() as admin:
        created = admin.create_key("crm", ["passes:read"], tenant_id="acme")
    for _ in range(calls):  # a new connection each: the kernel spreads them over the workers
        with server.client() as client:
            answer = client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert answer.code == key_verifier_pb2.VERIFY_CODE_VALID
    first = wait_for(lambda: counted(scrape(port), calls), "the calls counted")
    assert verified_ok(first) == calls
    assert first[("apikeys_verify_total", frozenset({("code", "VALID")}))] == calls
    # Sampled figures arrive within a second, merged over the live workers.
    entries = ("apikeys_cache_entries", frozenset({("cache", "positive")}))
    sampled = wait_for(lambda: (lambda s: s if entries in s else None)(scrape(port)), "sampled")
    assert sampled[("apikeys_cache_hits_total", frozenset({("cache", "positive")}))] >= 0

    workers = children(server.process.pid)
    assert len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(children(server.process.pid) - {victim}) == 2, "a new worker")
    after = scrape(port)
    assert verified_ok(after) == calls  # the dead worker's calls still count
