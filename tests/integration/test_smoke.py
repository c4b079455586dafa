"""A first end-to-end pass over the in-process server, on SQLite and PostgreSQL."""

from apikeys.v1 import key_verifier_pb2
from tests.support import RunningServer


class TestSmoke:
    def test_create_verify_revoke(self, server: RunningServer) -> None:
        """A created key verifies, then answers REVOKED right after RevokeKey returns."""
        with server.client() as client:
            created = client.create_key("crm-sync-prod", ["passes:read"], tenant_id="acme")
            ok = client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert ok.code == key_verifier_pb2.VERIFY_CODE_VALID
            client.revoke_key(created.key.id, tenant_id="acme")
            gone = client.verify(created.secret, ["passes:read"], tenant_id="acme")
            assert gone.code == key_verifier_pb2.VERIFY_CODE_REVOKED
            assert gone.http_status == 401
