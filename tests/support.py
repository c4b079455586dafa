"""Helpers shared by the test suites: a controllable clock and a running in-process server."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import grpc

from apikeys.v1 import key_manager_pb2_grpc, key_verifier_pb2_grpc
from apikeys_client import ApiKeysClient
from apikeys_server.app import App, create_server
from apikeys_server.config import Settings
from apikeys_server.domain import scopes
from apikeys_server.domain.validation import PLATFORM_TENANT

ADMIN_SCOPES = (scopes.MANAGE, scopes.READ, scopes.VERIFY)


class FakeClock:
    """A clock that only moves when told to (thread-safe)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC).replace(microsecond=0)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._now += delta
            return self._now

    def set(self, value: datetime) -> None:
        with self._lock:
            self._now = value


@dataclass
class RunningServer:
    """A started App on a free port, with a platform admin key to call it with."""

    app: App
    clock: FakeClock
    admin_key: str
    admin_key_id: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def client(self, api_key: str | None = None) -> ApiKeysClient:
        # No client retries: the tests judge the server's own answers (an UNAVAILABLE must
        # show as one, not as a slower success or a deadline after the client's retries).
        return ApiKeysClient(self.target, api_key or self.admin_key, timeout=10, retries=False)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stubs(
        self, channel: grpc.Channel
    ) -> tuple[key_manager_pb2_grpc.KeyManagerStub, key_verifier_pb2_grpc.KeyVerifierStub]:
        return (
            key_manager_pb2_grpc.KeyManagerStub(channel),
            key_verifier_pb2_grpc.KeyVerifierStub(channel),
        )


def settle(server: RunningServer) -> None:
    """Applies every committed change of the feed now (the follower would within its tick)."""
    follower = server.app.services.follower
    assert follower is not None
    assert follower.catch_up()


def server_settings(database_url: str, **overrides: object) -> Settings:
    base = Settings(
        database_url=database_url,
        listen="127.0.0.1:0",
        workers=8,
        last_used_flush_seconds=3600.0,  # tests flush explicitly
        shutdown_grace_seconds=1.0,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@contextmanager
def running_server(settings: Settings, clock: FakeClock | None = None) -> Iterator[RunningServer]:
    clock = clock or FakeClock()
    app = create_server(settings, clock)
    issued = app.services.manager.create_unchecked(
        PLATFORM_TENANT, "test-admin", ADMIN_SCOPES, expire_time=None
    )
    app.start()
    try:
        yield RunningServer(app, clock, issued.secret, issued.key.id)
    finally:
        app.stop(grace=1.0)
