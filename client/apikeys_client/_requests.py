"""What both clients share: each request message built from a method's arguments, the call
options (metadata, deadline) and the channel options (retries, round robin, keepalive).

The sync ``ApiKeysClient`` and the ``grpc.aio`` ``AsyncApiKeysClient`` differ only in how they
call; everything a call sends is decided here.
"""

import ipaddress
import json
import socket
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from apikeys.v1 import key_manager_pb2, key_verifier_pb2

DEFAULT_TIMEOUT_SECONDS = 5.0

# Calls that change nothing, so a retry after UNAVAILABLE cannot do anything twice. CreateKey,
# RotateKey, UpdateKey and RevokeKey are never retried by the channel (a retry of a create is
# safe only with the same request_id, which the caller decides).
IDEMPOTENT_METHODS = (
    ("apikeys.v1.KeyVerifier", "Verify"),
    ("apikeys.v1.KeyManager", "GetKey"),
    ("apikeys.v1.KeyManager", "ListKeys"),
    ("apikeys.v1.KeyManager", "ListScopes"),
    ("apikeys.v1.KeyManager", "ListEvents"),
)

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(*, retries: bool = True) -> str:
    """gRPC service config: round robin over every address of the target, and retries of
    UNAVAILABLE (within the call's deadline) for the idempotent methods only."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries:
        config["methodConfig"] = [
            {
                "name": [{"service": s, "method": m} for s, m in IDEMPOTENT_METHODS],
                "retryPolicy": RETRY_POLICY,
            }
        ]
    return json.dumps(config)


def channel_options(
    *,
    retries: bool = True,
    keepalive_seconds: float = 30.0,
    authority: str | None = None,
) -> list[tuple[str, Any]]:
    """Options for a channel the client owns: the service config above (the resolver's own
    config ignored), keepalive pings so a dead peer is noticed between calls."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retries=retries)),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1 if retries else 0),
        ("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect to a restarted server within the retries' window (gRPC's default first
        # reconnect waits 1 s), backing off to 5 s while it stays down.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]
    if authority:
        options.append(("grpc.default_authority", authority))
    return options


def channel_target(target: str) -> tuple[str, str | None]:
    """The gRPC target for ``target``, and the authority to present (for TLS) when it changed.

    ``"host:port"`` and URIs (``dns:///name:port``, ``ipv4:…``, ``unix:…``) pass unchanged.
    ``"a:port,b:port"`` lists servers: IP literals become an ``ipv4:``/``ipv6:`` target, names
    are resolved once here (static resolution; use ``dns:///name:port`` to follow DNS). The
    authority is then the first name given, so TLS checks the certificate against it.
    """
    if "," not in target:
        return target, None
    parts = [part.strip() for part in target.split(",") if part.strip()]
    v4: list[str] = []
    v6: list[str] = []
    first_host = _split(parts[0])[0]
    for part in parts:
        host, port = _split(part)
        for address in _addresses(host, port):
            if ipaddress.ip_address(address).version == 4:
                v4.append(f"{address}:{port}")
            else:
                v6.append(f"[{address}]:{port}")
    if v4 and v6:
        raise ValueError(f"target {target!r} mixes IPv4 and IPv6 addresses; list one family")
    resolved = "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)
    authority = None if _is_ip(first_host) else f"{first_host}:{_split(parts[0])[1]}"
    return resolved, authority


def _split(part: str) -> tuple[str, int]:
    host, sep, port = part.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{part!r}: each address of a target list needs host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _addresses(host: str, port: int) -> list[str]:
    """The host's addresses; for a name with both families (``localhost``), the IPv4 ones."""
    if _is_ip(host):
        return [host]
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    v4 = [address for address in addresses if ipaddress.ip_address(address).version == 4]
    return v4 or addresses


def metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", api_key),)


# -- requests, one per method ---------------------------------------------------------------


def verify(
    key: str, required_scopes: Iterable[str], tenant_id: str
) -> key_verifier_pb2.VerifyRequest:
    return key_verifier_pb2.VerifyRequest(
        key=key, tenant_id=tenant_id, required_scopes=list(required_scopes)
    )


def watch_key_changes(
    after_position: int, tenant_id: str
) -> key_verifier_pb2.WatchKeyChangesRequest:
    return key_verifier_pb2.WatchKeyChangesRequest(
        after_position=after_position, tenant_id=tenant_id
    )


def create_key(
    name: str,
    scopes: Iterable[str],
    tenant_id: str,
    expire_time: datetime | None,
    request_id: str | None,
) -> key_manager_pb2.CreateKeyRequest:
    request = key_manager_pb2.CreateKeyRequest(
        tenant_id=tenant_id, name=name, scopes=list(scopes), request_id=_request_id(request_id)
    )
    if expire_time is not None:
        request.expire_time.CopyFrom(_timestamp(expire_time))
    return request


def get_key(key_id: str, tenant_id: str) -> key_manager_pb2.GetKeyRequest:
    return key_manager_pb2.GetKeyRequest(tenant_id=tenant_id, key_id=key_id)


def list_keys(
    token: str, tenant_id: str, include_revoked: bool, name_prefix: str, page_size: int
) -> key_manager_pb2.ListKeysRequest:
    return key_manager_pb2.ListKeysRequest(
        tenant_id=tenant_id,
        page_size=page_size,
        page_token=token,
        include_revoked=include_revoked,
        name_prefix=name_prefix,
    )


def update_key(
    key_id: str, tenant_id: str, name: str | None, scopes: Iterable[str] | None
) -> key_manager_pb2.UpdateKeyRequest:
    """Only the arguments given are changed (named in the update mask)."""
    paths = []
    request = key_manager_pb2.UpdateKeyRequest(tenant_id=tenant_id, key_id=key_id)
    if name is not None:
        request.name = name
        paths.append("name")
    if scopes is not None:
        request.scopes.extend(scopes)
        paths.append("scopes")
    request.update_mask.CopyFrom(FieldMask(paths=paths))
    return request


def rotate_key(
    key_id: str, overlap: timedelta, tenant_id: str, request_id: str | None
) -> key_manager_pb2.RotateKeyRequest:
    request = key_manager_pb2.RotateKeyRequest(
        tenant_id=tenant_id, key_id=key_id, request_id=_request_id(request_id)
    )
    request.overlap.CopyFrom(_duration(overlap))
    return request


def revoke_key(key_id: str, tenant_id: str, reason: str) -> key_manager_pb2.RevokeKeyRequest:
    return key_manager_pb2.RevokeKeyRequest(tenant_id=tenant_id, key_id=key_id, reason=reason)


def revoke_leaked_keys(
    secrets: Iterable[str], source: str, url: str
) -> key_manager_pb2.RevokeLeakedKeysRequest:
    return key_manager_pb2.RevokeLeakedKeysRequest(secrets=list(secrets), source=source, url=url)


def list_scopes() -> key_manager_pb2.ListScopesRequest:
    return key_manager_pb2.ListScopesRequest()


def list_events(
    token: str, tenant_id: str, key_id: str, page_size: int
) -> key_manager_pb2.ListEventsRequest:
    return key_manager_pb2.ListEventsRequest(
        tenant_id=tenant_id, key_id=key_id, page_size=page_size, page_token=token
    )


def _request_id(given: str | None) -> str:
    """A fresh UUID unless the caller chose an id (or ``""``: none)."""
    return str(uuid.uuid4()) if given is None else given


def _timestamp(value: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(value)
    return message


def _duration(value: timedelta) -> Duration:
    message = Duration()
    message.FromTimedelta(value)
    return message
