"""/metrics of a real server: scraped over HTTP after calls, parsed with prometheus-client."""

import urllib.request

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from apikeys.v1 import key_verifier_pb2
from apikeys_client import ApiKeysClient, Unauthenticated
from tests.support import RunningServer, running_server, server_settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, method: str, code: str, service: str = "KeyVerifier") -> float:
    return value(
        samples,
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service=f"apikeys.v1.{service}",
        grpc_method=method,
        grpc_code=code,
    )


@pytest.fixture
def metered(sqlite_url: str) -> RunningServer:
    settings = server_settings(sqlite_url, metrics_listen="127.0.0.1:0")
    with running_server(settings) as server:
        yield server  # type: ignore[misc]


def test_counters_move_after_calls(metered: RunningServer) -> None:
    assert metered.app.metrics is not None
    port = metered.app.metrics.port
    before = scrape(port)
    with metered.client() as client:
        created = client.create_key("crm", ["passes:read"], tenant_id="acme")
        for _ in range(3):
            answer = client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert answer.code == key_verifier_pb2.VERIFY_CODE_VALID
        unknown = client.verify("ak_" + "A" * 38, [], tenant_id="acme")
        assert unknown.code != key_verifier_pb2.VERIFY_CODE_VALID
    stranger = ApiKeysClient(metered.target, "ak_" + "B" * 38, timeout=10)
    with stranger, pytest.raises(Unauthenticated):
        stranger.verify(created.secret, [], tenant_id="acme")
    with metered.channel() as channel:
        authz = external_auth_pb2_grpc.AuthorizationStub(channel)
        caller = (("x-api-key", metered.admin_key),)
        # A platform caller and a route without a tenant: a misconfiguration, INVALID_ARGUMENT.
        with pytest.raises(grpc.RpcError):
            authz.Check(external_auth_pb2.CheckRequest(), metadata=caller, timeout=10)
    after = scrape(port)

    assert handled(after, "Verify", "OK") - handled(before, "Verify", "OK") == 4
    assert (
        handled(after, "Verify", "UNAUTHENTICATED") - handled(before, "Verify", "UNAUTHENTICATED")
        == 1
    )
    assert handled(after, "CreateKey", "OK", "KeyManager") == 1
    check = ("grpc_server_handled_total", "envoy.service.auth.v3.Authorization", "Check")
    assert (
        value(
            after,
            check[0],
            grpc_type="unary",
            grpc_service=check[1],
            grpc_method=check[2],
            grpc_code="INVALID_ARGUMENT",
        )
        == 1
    )
    latency = value(
        after,
        "grpc_server_handling_seconds_count",
        grpc_type="unary",
        grpc_service="apikeys.v1.KeyVerifier",
        grpc_method="Verify",
        grpc_code="OK",
    )
    assert latency == 4
    assert value(after, "apikeys_verify_total", code="VALID") == 3
    assert value(after, "apikeys_cache_hits_total", cache="positive") >= 2
    assert value(after, "apikeys_cache_misses_total") >= 1
    assert value(after, "apikeys_cache_entries", cache="positive") >= 1
    assert ("apikeys_db_pool_in_use", frozenset({("engine", "read")})) in after
    assert ("apikeys_feed_confirmed_age_seconds", frozenset()) in after
    assert ("apikeys_last_used_flush_lag_seconds", frozenset()) in after
    assert ("apikeys_db_errors_total", frozenset()) in after


def test_off_by_default(sqlite_url: str) -> None:
    with running_server(server_settings(sqlite_url)) as server:
        assert server.app.metrics is None


def test_transport_refusals_are_counted(sqlite_url: str) -> None:
    """A stream over the cap shows in apikeys_refused_total{reason="streams"}; open streams
    and waiting calls are gauges."""
    settings = server_settings(sqlite_url, metrics_listen="127.0.0.1:0", max_streams=1)
    with running_server(settings) as server, server.channel() as channel:
        assert server.app.metrics is not None
        _, verifier = server.stubs(channel)
        metadata = (("x-api-key", server.admin_key),)
        request = key_verifier_pb2.WatchKeyChangesRequest()
        watch = verifier.WatchKeyChanges(request, metadata=metadata, timeout=30)
        next(watch)
        with pytest.raises(grpc.RpcError) as refused:
            next(verifier.WatchKeyChanges(request, metadata=metadata, timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        samples = scrape(server.app.metrics.port)
        watch.cancel()
    assert value(samples, "apikeys_refused_total", reason="streams") == 1
    assert value(samples, "apikeys_refused_total", reason="overloaded") == 0
    assert value(samples, "apikeys_streams_open") == 1
    assert ("apikeys_calls_waiting", frozenset()) in samples
