"""request_id on CreateKey and RotateKey (AIP-155): a retry never makes a second key.

Over a real server on SQLite and PostgreSQL: the retry's answer, concurrent duplicates, the same
id with another request, the 24-hour window (FakeClock), rotation, and ids that are refused.
"""

import threading
import uuid
from datetime import timedelta

import grpc
import pytest
from sqlalchemy import create_engine, func, select

from apikeys.v1 import key_manager_pb2
from apikeys_client import AlreadyExists, ApiKeysError, InvalidArgument
from apikeys_server.domain import scopes
from apikeys_server.storage.models import api_keys, key_requests
from tests.support import RunningServer

THREADS = 8


def _count(database_url: str, table=api_keys, **where: str) -> int:
    engine = create_engine(database_url)
    try:
        statement = select(func.count()).select_from(table)
        for column, value in where.items():
            statement = statement.where(table.c[column] == value)
        with engine.connect() as connection:
            return int(connection.execute(statement).scalar_one())
    finally:
        engine.dispose()


def _tenant_admin(server: RunningServer, tenant: str) -> str:
    manager = server.app.services.manager
    issued = manager.create_unchecked(tenant, "tenant-admin", (scopes.MANAGE, scopes.READ), None)
    return issued.secret


class TestCreate:
    def test_retry_makes_one_key_and_says_so(self, server: RunningServer, database_url) -> None:
        """The same request twice: one key; the retry is ALREADY_EXISTS naming it, no secret."""
        with server.client() as client:
            first = client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="r-1")
            with pytest.raises(AlreadyExists) as raised:
                client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="r-1")
            keys = list(client.list_keys(tenant_id="acme"))
        assert [key.id for key in keys] == [first.key.id]
        details = raised.value.details
        assert raised.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert "already" in details and first.key.id in details
        assert "cannot be shown again" in details and "revoke" in details
        assert first.secret not in details
        assert _count(database_url, key_requests) == 1

    def test_scopes_in_another_order_are_the_same_request(self, server: RunningServer) -> None:
        with server.client() as client:
            client.create_key(
                "svc", ["passes:read", "passes:write"], request_id="r-2", tenant_id="acme"
            )
            with pytest.raises(AlreadyExists):
                client.create_key(
                    "svc", ["passes:write", "passes:read"], request_id="r-2", tenant_id="acme"
                )

    @pytest.mark.parametrize(
        "change",
        [{"name": "other"}, {"scopes": ["passes:write"]}, {"tenant_id": "globex"}],
        ids=["name", "scopes", "tenant"],
    )
    def test_same_id_for_another_request_is_invalid(
        self, server: RunningServer, change: dict
    ) -> None:
        """Another name, scopes or tenant with the same id: INVALID_ARGUMENT, no second key."""
        asked = {"name": "svc", "scopes": ["passes:read"], "tenant_id": "acme"}
        with server.client() as client:
            client.create_key(**asked, request_id="r-3")
            with pytest.raises(InvalidArgument, match="reused for a different request"):
                client.create_key(**{**asked, **change}, request_id="r-3")
            assert len(list(client.list_keys(tenant_id="acme"))) == 1
            assert list(client.list_keys(tenant_id="globex")) == []

    def test_another_expire_time_is_another_request(self, server: RunningServer) -> None:
        later = server.clock.now() + timedelta(days=1)
        with server.client() as client:
            client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="r-4")
            with pytest.raises(InvalidArgument, match="reused for a different request"):
                client.create_key(
                    "svc", ["passes:read"], tenant_id="acme", expire_time=later, request_id="r-4"
                )

    def test_ids_are_scoped_to_the_callers_tenant(self, server: RunningServer) -> None:
        """Two tenants' callers may use the same id: each gets its own key."""
        acme, globex = _tenant_admin(server, "acme"), _tenant_admin(server, "globex")
        with server.client(acme) as a, server.client(globex) as g:
            made_a = a.create_key("svc", ["passes:read"], request_id="shared")
            made_g = g.create_key("svc", ["passes:read"], request_id="shared")
            assert made_a.key.tenant_id == "acme" and made_g.key.tenant_id == "globex"
            with pytest.raises(AlreadyExists, match=made_a.key.id):
                a.create_key("svc", ["passes:read"], request_id="shared")

    def test_concurrent_duplicates_make_exactly_one_key(
        self, server: RunningServer, database_url: str
    ) -> None:
        """Threads racing with one id: one key; every other thread is told it already exists."""
        barrier = threading.Barrier(THREADS)
        made: list[str] = []
        refused: list[ApiKeysError] = []
        unexpected: list[BaseException] = []

        def create() -> None:
            with server.client() as client:
                barrier.wait(timeout=10)
                try:
                    response = client.create_key(
                        "svc", ["passes:read"], tenant_id="acme", request_id="race"
                    )
                    made.append(response.key.id)
                except AlreadyExists as error:
                    refused.append(error)
                except BaseException as error:
                    unexpected.append(error)

        threads = [threading.Thread(target=create) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert unexpected == []
        assert len(made) == 1
        assert len(refused) == THREADS - 1
        assert all(made[0] in error.details for error in refused)
        assert _count(database_url, tenant_id="acme") == 1

    def test_after_24_hours_the_id_may_be_reused(
        self, server: RunningServer, database_url: str
    ) -> None:
        """Past the window the id is forgotten: the same request makes a new key; the old
        record is pruned by a later create."""
        with server.client() as client:
            first = client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="day")
            server.clock.advance(timedelta(hours=23, minutes=59))
            with pytest.raises(AlreadyExists):
                client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="day")
            client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="other")
            server.clock.advance(timedelta(minutes=2))
            second = client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="day")
            assert second.key.id != first.key.id
            with pytest.raises(AlreadyExists, match=second.key.id):
                client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="day")
            assert _count(database_url, key_requests) == 2  # "day" was replaced in place
            # A day later, the next create prunes every older id.
            server.clock.advance(timedelta(hours=24, seconds=1))
            client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="prune")
        assert _count(database_url, key_requests) == 1
        assert _count(database_url, key_requests, request_id="prune") == 1

    def test_without_request_id_every_call_makes_a_key(
        self, server: RunningServer, database_url: str
    ) -> None:
        with server.client() as client:
            for _ in range(2):
                client.create_key("svc", ["passes:read"], tenant_id="acme", request_id="")
        assert _count(database_url, tenant_id="acme") == 2
        assert _count(database_url, key_requests) == 0

    def test_the_client_sends_a_fresh_uuid_by_default(self, server: RunningServer) -> None:
        sent: list[str] = []
        with server.client() as client:
            original = client._manager.CreateKey

            def spy(request: key_manager_pb2.CreateKeyRequest, **kwargs):
                sent.append(request.request_id)
                return original(request, **kwargs)

            client._manager.CreateKey = spy  # type: ignore[method-assign]
            client.create_key("svc", ["passes:read"], tenant_id="acme")
            client.create_key("svc", ["passes:read"], tenant_id="acme")
            assert len(list(client.list_keys(tenant_id="acme"))) == 2
        assert len(set(sent)) == 2
        assert all(uuid.UUID(value).version == 4 for value in sent)


class TestRotate:
    def test_retry_makes_one_successor_and_says_so(self, server: RunningServer) -> None:
        with server.client() as client:
            old = client.create_key("svc", ["passes:read"], tenant_id="acme")
            rotated = client.rotate_key(
                old.key.id, timedelta(hours=1), tenant_id="acme", request_id="rot-1"
            )
            with pytest.raises(AlreadyExists) as raised:
                client.rotate_key(
                    old.key.id, timedelta(hours=1), tenant_id="acme", request_id="rot-1"
                )
            keys = {key.id for key in client.list_keys(tenant_id="acme")}
        assert keys == {old.key.id, rotated.key.id}
        assert rotated.key.id in raised.value.details
        assert "cannot be shown again" in raised.value.details

    def test_another_overlap_or_key_is_another_request(self, server: RunningServer) -> None:
        with server.client() as client:
            one = client.create_key("one", ["passes:read"], tenant_id="acme")
            two = client.create_key("two", ["passes:read"], tenant_id="acme")
            client.rotate_key(one.key.id, timedelta(hours=1), tenant_id="acme", request_id="rot")
            with pytest.raises(InvalidArgument, match="reused for a different request"):
                client.rotate_key(
                    one.key.id, timedelta(hours=2), tenant_id="acme", request_id="rot"
                )
            with pytest.raises(InvalidArgument, match="reused for a different request"):
                client.rotate_key(
                    two.key.id, timedelta(hours=1), tenant_id="acme", request_id="rot"
                )
            # A create with a rotation's id is another request too.
            with pytest.raises(InvalidArgument, match="reused for a different request"):
                client.create_key("one", ["passes:read"], tenant_id="acme", request_id="rot")

    def test_concurrent_duplicates_make_exactly_one_successor(
        self, server: RunningServer, database_url: str
    ) -> None:
        with server.client() as client:
            old = client.create_key("svc", ["passes:read"], tenant_id="acme")
        barrier = threading.Barrier(THREADS)
        made: list[str] = []
        refused: list[ApiKeysError] = []
        unexpected: list[BaseException] = []

        def rotate() -> None:
            with server.client() as client:
                barrier.wait(timeout=10)
                try:
                    response = client.rotate_key(
                        old.key.id, timedelta(hours=1), tenant_id="acme", request_id="rot-race"
                    )
                    made.append(response.key.id)
                except AlreadyExists as error:
                    refused.append(error)
                except BaseException as error:
                    unexpected.append(error)

        threads = [threading.Thread(target=rotate) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert unexpected == []
        assert len(made) == 1 and len(refused) == THREADS - 1
        assert _count(database_url, tenant_id="acme") == 2

    def test_after_24_hours_a_retry_is_an_ordinary_rotation(self, server: RunningServer) -> None:
        """The id forgotten, the key's own state answers: it was already rotated."""
        with server.client() as client:
            old = client.create_key("svc", ["passes:read"], tenant_id="acme")
            client.rotate_key(old.key.id, timedelta(0), tenant_id="acme", request_id="rot-day")
            server.clock.advance(timedelta(hours=24, seconds=1))
            with pytest.raises(ApiKeysError) as raised:
                client.rotate_key(old.key.id, timedelta(0), tenant_id="acme", request_id="rot-day")
        assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION


class TestBadIds:
    @pytest.mark.parametrize(
        "request_id",
        ["x" * 65, "tab\there", "new\nline", "ünïcode", "nul\x00"],
        ids=["too-long", "tab", "newline", "non-ascii", "nul"],
    )
    def test_refused(self, server: RunningServer, request_id: str) -> None:
        with server.client() as client:
            with pytest.raises(InvalidArgument, match="request_id"):
                client.create_key("svc", ["passes:read"], tenant_id="acme", request_id=request_id)
            old = client.create_key("svc", ["passes:read"], tenant_id="acme")
            with pytest.raises(InvalidArgument, match="request_id"):
                client.rotate_key(old.key.id, timedelta(0), tenant_id="acme", request_id=request_id)
            assert len(list(client.list_keys(tenant_id="acme"))) == 1

    @pytest.mark.parametrize("request_id", ["x" * 64, str(uuid.uuid4()), "a b ~!@#$%^&*()"])
    def test_accepted(self, server: RunningServer, request_id: str) -> None:
        with server.client() as client:
            client.create_key("svc", ["passes:read"], tenant_id="acme", request_id=request_id)
