"""Who may do what: the authenticated caller, its scopes and the tenants it acts on."""

from dataclasses import dataclass

from apikeys_server.domain.errors import InvalidArgument, PermissionDenied
from apikeys_server.domain.validation import PLATFORM_TENANT, shown, validate_tenant


@dataclass(frozen=True, slots=True)
class Caller:
    """The key that authenticated a call (from the ``x-api-key`` metadata)."""

    key_id: str
    tenant_id: str
    scopes: frozenset[str]

    @property
    def is_platform(self) -> bool:
        return self.tenant_id == PLATFORM_TENANT

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(
                f"the caller's key {self.key_id} lacks the scope {scope!r}",
                reason="CALLER_LACKS_SCOPE",
            )

    def resolve_tenant(self, requested: str) -> str:
        """The tenant a call acts on: platform keys name it, tenant keys default to their own."""
        if self.is_platform:
            if not requested:
                raise InvalidArgument(
                    "tenant_id is required when calling with a platform key",
                    reason="TENANT_REQUIRED",
                    field="tenant_id",
                )
            return validate_tenant(requested)
        if not requested or requested == self.tenant_id:
            return self.tenant_id
        validate_tenant(requested)
        raise PermissionDenied(
            f"the caller's key acts on tenant {shown(self.tenant_id)} only, "
            f"not on {shown(requested)}",
            reason="TENANT_MISMATCH",
        )
